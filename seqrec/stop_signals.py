"""Stopping a training job cleanly on a signal.

Clusters warn before they take a job away: SLURM sends the signal a job asks for ahead of its
time limit (`sbatch --signal=B:USR1@300`, which launcher/slurm/train.sbatch forwards to the
tasks), and SIGTERM on preemption or `scancel`, with SIGKILL after a grace period; torchrun
forwards SIGTERM to its workers the same way. Without a handler each of these kills the trainer
and loses every step since the last checkpoint (with the default `train.checkpoint_every: 0`,
the whole run).

The handler only records the signal. The training loop looks at step boundaries, where the
ranks already agree whether all of them have a full step (seqrec.train): a signal that reached
any one rank stops all of them at the same step, a checkpoint is written there, and the job
exits with STOPPED_EXIT_CODE, so that `--resume auto` continues it exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h: a temporary failure, where running the same command again is
# expected to succeed (with --resume auto, from the checkpoint the stop wrote).
STOPPED_EXIT_CODE = 75

# What a cluster, a launcher or an operator sends to end a job (SIGXCPU: a CPU-time limit).
# SIGKILL and SIGSTOP cannot be caught.
STOP_SIGNAL_NAMES = tuple(name for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU") if hasattr(signal, name))


def signal_problem(name: object) -> str | None:
    """Why `name` cannot be a stop signal, or None when it can."""
    if name not in STOP_SIGNAL_NAMES:
        return f"{name!r} is not one of {', '.join(STOP_SIGNAL_NAMES)}"
    return None


class StopSignals:
    """Records the first of `names` this process receives, while in its `with` block.

    A second signal while the stop is under way means "now": the previous handler is put back
    and the signal delivered again (for SIGTERM or SIGUSR1: the process ends without the
    checkpoint). Handlers can only be installed from the main thread; elsewhere (an embedding
    application's worker thread) the signals keep their handlers and a warning says so.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(dict.fromkeys(names))
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if not self.names:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("train.stop_signals: not on the main thread, so %s keep their handlers; a signal will not checkpoint",
                        ", ".join(self.names))
            return self
        for name in self.names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default stands in.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: only note the signal, act at the next step.
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self._restore()
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.received is not None


@contextmanager
def held_back(names: Sequence[str]) -> Iterator[None]:
    """Blocks `names` in this thread while inside. A cluster signals every process of a task
    (SLURM's process tracking), and the default action of SIGUSR1 or SIGTERM would end the
    reader's workers, its forkserver and multiprocessing's resource tracker before the trainer,
    which decides when to stop, has checkpointed. Processes started in here inherit the blocked
    mask (it survives fork and exec) and never act on these signals; they still end with the
    trainer. A signal that reaches this process meanwhile waits, and is handled on leaving."""
    signals = {signal.Signals[name] for name in names}
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
