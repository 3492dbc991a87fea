"""Stopping the lab's child processes (moto's server, the fault proxy) the same way every time.

Owns :func:`stop_process` (terminate, wait, kill if it does not exit) and :func:`kill_process`
(kill without waiting, for finalizers).
"""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """Terminate ``proc`` and wait up to ``timeout`` s for it; if it is still running, kill it and wait
    again (up to ``timeout`` s). Does nothing for ``None`` or a process that has already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def kill_process(proc: subprocess.Popen[Any] | None) -> None:
    """Kill ``proc`` if it is still running, without waiting (for ``__del__``, where blocking is unwelcome)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
