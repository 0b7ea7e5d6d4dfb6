"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

from os import PathLike


class SeqrecError(Exception):
    """Base class: the message alone tells the user what is wrong and where."""


class InputError(SeqrecError):
    """Bad input data: names the file, the line when known, and the reason."""

    def __init__(self, path: str | PathLike, reason: str, line: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ConfigError(SeqrecError):
    """A configuration value is invalid: names the field and what is allowed."""


class ShardError(SeqrecError):
    """A prepared dataset or one of its shards is missing, corrupt or of the wrong version."""


class TrainingStopped(SeqrecError):
    """Training stopped at a step boundary on a stop signal, after writing a checkpoint: the same
    command with `--resume auto` continues it (seqrec.stop_signals)."""


class TrainingDiverged(SeqrecError):
    """The training loss went NaN or infinite: training ended before a checkpoint or validation
    used the poisoned weights (seqrec.divergence)."""
