"""Progress bars: tqdm on a terminal (stderr), nothing in pipes or CI logs."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(*, total: int | None, unit: str, desc: str, enabled: bool | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr, shown only when stderr is a terminal (or `enabled` says so)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True, **kw)
