"""Progress bars: tqdm on a terminal (stderr), nothing in pipes or CI logs.

tqdm is imported only when a bar is shown: its import is a tenth of a command's start-up, which a
command in a pipe (or a DataLoader worker) should not pay for a bar it never draws.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Bar(Protocol):
    """What the commands use of a bar; a context manager."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> Any: ...


class _NoBar:
    """The bar of a pipe: counts nothing, draws nothing."""

    def update(self, n: float | None = 1) -> None:
        return None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None:
        return None


def progress_bar(*, total: int | None, unit: str, desc: str, enabled: bool | None = None, **kw: Any) -> Bar:
    """A tqdm bar on stderr, shown only when stderr is a terminal (or `enabled` says so)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    bar: Bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)
    return bar
