"""Progress bars and rank-0 printing for long work.

``progress(iterable, total=..., desc=...)`` is a tqdm bar on stderr, quiet when
``R1ZERO_PROGRESS=0`` or when not on rank 0 (``RANK`` env), so multi-process logs stay readable.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def enabled() -> bool:
    return os.environ.get("R1ZERO_PROGRESS", "1") != "0" and is_rank0()


def progress(iterable=None, total=None, desc: str | None = None, unit: str = "it", **kw):
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, **kw)


def print0(*args, **kw) -> None:
    if is_rank0():
        print(*args, **kw, flush=True)
