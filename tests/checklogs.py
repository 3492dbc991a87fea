"""Fail tests on unexpected warnings: a pytest plugin plus :func:`expect_logs` to declare the expected ones.

While a test runs (its setup, call and teardown phases), every record at WARNING or above that a logger
under ``s3fsimg`` or ``s3fsimg_lab`` emits in the pytest process, from any thread, is collected. At the end
of each phase, undeclared records fail that phase with their logger, level and message — the call phase
as a test failure, setup/teardown as a test error. If the phase already failed for another reason, that
failure is reported and the records are not (pytest's "Captured log" section still shows them).

Declare an expected record where it happens::

    from tests.checklogs import expect_logs

    with expect_logs(r"fails its checksum", count=1):
        ds.get(key)

``pattern`` is a regular expression searched (``re.search``) in the formatted message; ``level`` must be
the record's level exactly (expecting a WARNING does not excuse an ERROR); ``count=None`` accepts any
number of matching records, including none (for retries that depend on timing), ``count=N`` demands
exactly N once the block exits without an exception. Nested declarations are tried innermost first; a
record is counted by one declaration only.

Out of scope: child processes (mount subprocesses, cache worker processes) and records emitted outside
a test (collection, between tests). The plugin is loaded by ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

CHECKED_LOGGERS = ("s3fsimg", "s3fsimg_lab")
CHECKED_LEVEL = logging.WARNING


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a broken format string: show what there is
        return f"{record.msg!r} % {record.args!r}"


@dataclass
class _Expectation:
    regex: re.Pattern[str]
    level: int
    seen: int = 0


class _Collector(logging.Handler):
    """Attached to each checked logger: counts expected records, keeps the others while a test runs."""

    def __init__(self) -> None:
        super().__init__(CHECKED_LEVEL)
        self.active = False
        self.expectations: list[_Expectation] = []
        self.unexpected: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        if not self.active:
            return
        message = _message(record)
        for exp in reversed(self.expectations):
            if exp.level == record.levelno and exp.regex.search(message):
                exp.seen += 1
                return
        self.unexpected.append(record)

    def begin(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # createLock() always sets it
            self.active = True
            self.unexpected = []

    def drain(self, end: bool = False) -> list[logging.LogRecord]:
        with self.lock:  # type: ignore[union-attr]
            records, self.unexpected = self.unexpected, []
            if end:
                self.active = False
                self.expectations = []
            return records


_COLLECTOR = _Collector()


@contextmanager
def expect_logs(pattern: str, level: int = logging.WARNING, count: int | None = None) -> Iterator[_Expectation]:
    """Declare that records of ``level`` whose message matches ``pattern`` are expected inside the block.

    ``count=None``: any number of them; ``count=N``: exactly N (checked when the block exits normally).
    ``as exp``: ``exp.seen`` counts them, for a test that needs some but cannot know how many.
    """
    exp = _Expectation(re.compile(pattern), level)
    with _COLLECTOR.lock:  # type: ignore[union-attr]
        _COLLECTOR.expectations.append(exp)
    try:
        yield exp
    finally:
        with _COLLECTOR.lock:  # type: ignore[union-attr]
            if exp in _COLLECTOR.expectations:
                _COLLECTOR.expectations.remove(exp)
    if count is not None and exp.seen != count:
        pytest.fail(
            f"expected {count} {logging.getLevelName(level)} record(s) matching {pattern!r}, got {exp.seen}",
            pytrace=False,
        )


def _report(phase: str, records: list[logging.LogRecord]) -> str:
    lines = [f"unexpected log records during {phase} (declare them with tests.checklogs.expect_logs):"]
    for r in records:
        lines.append(f"  {r.name} {r.levelname}: {_message(r)}")
        if r.exc_info and r.exc_info[1] is not None:
            lines.append(f"    exception: {type(r.exc_info[1]).__name__}: {r.exc_info[1]}")
    return "\n".join(lines)


def _checked(phase: str, first: bool = False, last: bool = False) -> Generator[None, object, object]:
    if first:
        _COLLECTOR.begin()
    try:
        result = yield
    finally:
        records = _COLLECTOR.drain(end=last)
    if records:
        pytest.fail(_report(phase, records), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _checked("setup", first=True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _checked("call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    return (yield from _checked("teardown", last=True))


def pytest_configure(config: pytest.Config) -> None:
    for name in CHECKED_LOGGERS:
        logging.getLogger(name).addHandler(_COLLECTOR)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name in CHECKED_LOGGERS:
        logging.getLogger(name).removeHandler(_COLLECTOR)
