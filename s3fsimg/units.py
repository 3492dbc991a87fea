"""Parsing and printing of sizes (`500M`, `10G`) and durations (`30s`, `2m`)."""

from __future__ import annotations

import re

from s3fsimg.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_MULT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str, what: str = "size") -> int:
    """`10G` -> bytes (binary multiples: 1K = 1024). Raises ConfigError naming `what`."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (use e.g. 500M, 10G, 1T)")
    return int(float(m.group(1)) * _SIZE_MULT[m.group(2).upper()])


def parse_duration(text: str, what: str = "duration") -> float:
    """`30s`, `1.5m`, `500ms`, `20` (seconds) -> seconds."""
    m = _DURATION_RE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{what}: {text!r} is not a duration (use e.g. 30s, 2m, 500ms)")
    return float(m.group(1)) * _DURATION_MULT[(m.group(2) or "s").lower()]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
