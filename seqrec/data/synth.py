"""`seqrec synth`: the embedded default dataset, a deterministic interaction log with real sequential structure.

- Items have power-law (Zipf) popularity and belong to latent interest groups.
- Each user has a primary and a secondary interest group.
- Each item has a few preferred successors in its group; a user's next item follows one of
  them with probability `follow_prob`, else comes from the user's groups by popularity, else
  from global popularity. The next item is therefore far more predictable from the history
  than from popularity alone, which is what a sequential recommender must learn.
- Sequence lengths are log-normal, clipped to [min_length, max_length].

Generation is vectorised over users, one step of all active sequences at a time, so the
20-million-interaction benchmark log takes seconds. Rows are written in global time order,
users interleaved, like a real event log.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from seqrec.atomic import atomic_file
from seqrec.errors import ConfigError


@dataclass(frozen=True)
class SynthConfig:
    users: int
    items: int
    groups: int
    mean_length: float
    min_length: int = 3
    max_length: int = 200
    popularity_exponent: float = 1.05
    successors: int = 4
    follow_prob: float = 0.6
    group_prob: float = 0.3
    primary_group_prob: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "items", "groups", "min_length", "successors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synth {name} must be >= 1, got {getattr(self, name)!r}")
        if self.groups > self.items:
            raise ConfigError(f"synth groups ({self.groups}) cannot exceed items ({self.items})")
        if not self.min_length <= self.mean_length <= self.max_length:
            raise ConfigError(f"synth needs min_length <= mean_length <= max_length, got {self.min_length}, {self.mean_length}, {self.max_length}")
        if not (0 <= self.follow_prob and 0 <= self.group_prob and self.follow_prob + self.group_prob <= 1):
            raise ConfigError("synth follow_prob and group_prob must be >= 0 and sum to at most 1")


PRESETS = {
    "tiny": SynthConfig(users=300, items=120, groups=6, mean_length=12, max_length=40),
    "demo": SynthConfig(users=6_000, items=2_000, groups=24, mean_length=30, max_length=120),
    "medium": SynthConfig(users=50_000, items=20_000, groups=64, mean_length=40),
    # About 20 million interactions: the scale benchmark of `seqrec prepare`.
    "large": SynthConfig(users=400_000, items=200_000, groups=256, mean_length=50, max_length=400),
}


@dataclass
class SynthLog:
    users: np.ndarray  # int64, 1-based user ids, in time order
    items: np.ndarray  # int64, 1-based item ids
    timestamps: np.ndarray  # int64 seconds

    def __len__(self) -> int:
        return len(self.users)


def preset(name: str, **overrides) -> SynthConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown synth preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{key: value for key, value in overrides.items() if value is not None})


def generate(config: SynthConfig) -> SynthLog:
    rng = np.random.default_rng(config.seed)
    sampler = _GroupSampler(config, rng)
    successors = sampler.sample_in_groups(np.repeat(sampler.group_of_item, config.successors), rng)
    successors = successors.reshape(config.items, config.successors)
    successor_cdf = np.cumsum(0.5 ** np.arange(config.successors))
    successor_cdf /= successor_cdf[-1]

    primary = rng.integers(config.groups, size=config.users)
    secondary = rng.integers(config.groups, size=config.users)
    sigma = 0.8
    lengths = rng.lognormal(np.log(config.mean_length) - sigma**2 / 2, sigma, size=config.users)
    lengths = np.clip(np.round(lengths), config.min_length, config.max_length).astype(np.int64)
    offsets = np.zeros(config.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = np.empty(offsets[-1], dtype=np.int64)

    previous = np.zeros(config.users, dtype=np.int64)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)
        groups = np.where(rng.random(len(active)) < config.primary_group_prob, primary[active], secondary[active])
        chosen = sampler.sample_in_groups(groups, rng)
        if step > 0:
            draw = rng.random(len(active))
            follow = draw < config.follow_prob
            which = np.searchsorted(successor_cdf, rng.random(int(follow.sum())), side="right")
            chosen[follow] = successors[previous[active[follow]], which]
            anywhere = draw >= config.follow_prob + config.group_prob
            chosen[anywhere] = sampler.sample_global(int(anywhere.sum()), rng)
        items[offsets[active] + step] = chosen
        previous[active] = chosen

    user_of = np.repeat(np.arange(config.users, dtype=np.int64), lengths)
    step_of = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    start = rng.integers(1_500_000_000, 1_600_000_000, size=config.users)
    timestamps = start[user_of] + step_of * 3_600 + rng.integers(0, 3_600, size=len(step_of))
    order = np.argsort(timestamps, kind="stable")
    return SynthLog(user_of[order] + 1, items[order] + 1, timestamps[order])


def write_csv(synth_log: SynthLog, path: Path) -> None:
    table = pa.table({"user_id": synth_log.users, "item_id": synth_log.items, "timestamp": synth_log.timestamps})
    with atomic_file(Path(path), "wb") as handle:
        pacsv.write_csv(table, handle)


class _GroupSampler:
    """Popularity-weighted sampling of items, globally or within given groups, by inverse CDF."""

    def __init__(self, config: SynthConfig, rng: np.random.Generator):
        rank = rng.permutation(config.items) + 1
        self.weights = 1.0 / rank.astype(np.float64) ** config.popularity_exponent
        self.global_cdf = np.cumsum(self.weights)
        # Every group gets at least one item; the rest are assigned at random.
        self.group_of_item = np.concatenate(
            [np.arange(config.groups), rng.integers(config.groups, size=config.items - config.groups)]
        )
        rng.shuffle(self.group_of_item)
        self.by_group = np.argsort(self.group_of_item, kind="stable")
        self.group_cdf = np.cumsum(self.weights[self.by_group])
        counts = np.bincount(self.group_of_item, minlength=config.groups)
        self.group_end = np.cumsum(counts)
        self.group_start = self.group_end - counts
        self.cdf_low = np.where(self.group_start > 0, self.group_cdf[self.group_start - 1], 0.0)
        self.cdf_high = self.group_cdf[self.group_end - 1]

    def sample_in_groups(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        targets = self.cdf_low[groups] + rng.random(len(groups)) * (self.cdf_high[groups] - self.cdf_low[groups])
        positions = np.searchsorted(self.group_cdf, targets, side="right")
        positions = np.clip(positions, self.group_start[groups], self.group_end[groups] - 1)
        return self.by_group[positions]

    def sample_global(self, count: int, rng: np.random.Generator) -> np.ndarray:
        positions = np.searchsorted(self.global_cdf, rng.random(count) * self.global_cdf[-1], side="right")
        return np.minimum(positions, len(self.global_cdf) - 1)
