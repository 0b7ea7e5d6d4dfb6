"""Progress bars (tqdm): only on rank 0, only on a terminal, never under --quiet."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not enabled())
