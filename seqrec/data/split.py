"""Leave-one-out split: the last item is the test target, the second-to-last the validation target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqrec.data.sequences import UserSequences, gather_prefixes
from seqrec.errors import ConfigError

MIN_EVAL_LENGTH = 3
SHORT_USER_POLICIES = ("train", "drop")

SPLIT_RULE = (
    "leave-one-out: a user with n >= 3 items trains on items 1..n-2, is validated on item n-1 "
    "(history 1..n-2) and tested on item n (history 1..n-1). Users with fewer than 3 items are "
    "never evaluated: with short_users=train their whole sequence is a training sequence, with "
    "short_users=drop they are left out."
)


@dataclass
class EvalSet:
    """Histories (CSR) and targets of the evaluated users; `users` index rows of users.tsv."""

    users: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n + 1]
    history: np.ndarray  # int32
    targets: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.users)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"users": self.users, "offsets": self.offsets, "history": self.history, "targets": self.targets}


@dataclass
class LeaveOneOut:
    train_users: np.ndarray  # int64: user index of each training sequence
    train_offsets: np.ndarray
    train_items: np.ndarray
    valid: EvalSet
    test: EvalSet
    train_only_users: int
    dropped_users: int


def leave_one_out(sequences: UserSequences, short_users: str = "train") -> LeaveOneOut:
    if short_users not in SHORT_USER_POLICIES:
        raise ConfigError(f"short_users must be one of {SHORT_USER_POLICIES}, got {short_users!r}")
    lengths = sequences.lengths
    evaluated = np.flatnonzero(lengths >= MIN_EVAL_LENGTH)
    short = np.flatnonzero(lengths < MIN_EVAL_LENGTH)
    train_users = np.arange(sequences.num_users) if short_users == "train" else evaluated
    train_lengths = np.where(lengths >= MIN_EVAL_LENGTH, lengths - 2, lengths)[train_users]
    train_offsets, train_items = gather_prefixes(sequences.offsets, sequences.items, train_users, train_lengths)
    return LeaveOneOut(
        train_users=train_users.astype(np.int64),
        train_offsets=train_offsets,
        train_items=train_items,
        valid=_eval_set(sequences, evaluated, lengths[evaluated] - 2),
        test=_eval_set(sequences, evaluated, lengths[evaluated] - 1),
        train_only_users=len(short) if short_users == "train" else 0,
        dropped_users=len(short) if short_users == "drop" else 0,
    )


def _eval_set(sequences: UserSequences, users: np.ndarray, history_lengths: np.ndarray) -> EvalSet:
    offsets, history = gather_prefixes(sequences.offsets, sequences.items, users, history_lengths)
    targets = sequences.items[sequences.offsets[users] + history_lengths]
    return EvalSet(users.astype(np.int64), offsets, history, targets.astype(np.int32))
