"""The unexpected-log check of :mod:`tests.checklogs`: declared records pass, undeclared ones fail the test."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.checklogs import _COLLECTOR, expect_logs

log = logging.getLogger("s3fsimg.checklogs_selftest")
ROOT = Path(__file__).resolve().parents[1]


def test_declared_records_are_counted_and_excused() -> None:
    with expect_logs(r"block \w+ fails its checksum", count=2):
        log.warning("cache: block %s fails its checksum; dropping it", "abc")
        log.warning("cache: block %s fails its checksum; dropping it", "def")
    with expect_logs("EIO", level=logging.ERROR, count=1):
        log.error("EIO reading %s", "k")
    with expect_logs("maybe"):  # count=None: none at all is fine too
        pass
    assert _COLLECTOR.drain() == []


def test_records_from_other_threads_are_checked() -> None:
    with expect_logs("from a thread", count=1):
        t = threading.Thread(target=log.warning, args=("from a thread",))
        t.start()
        t.join()


def test_wrong_count_fails() -> None:
    message = r"expected 1 WARNING record\(s\) matching 'x', got 0"
    with pytest.raises(pytest.fail.Exception, match=message), expect_logs("x", count=1):
        log.info("x at INFO is not checked")


def test_undeclared_and_wrong_level_records_are_collected() -> None:
    with expect_logs("retry", level=logging.WARNING):
        log.error("retry failed")  # an ERROR is not excused by a WARNING declaration
    logging.getLogger("s3fsimg_lab.selftest").warning("lab warning")
    logging.getLogger("elsewhere").warning("not watched")
    got = [(r.name, r.levelname, r.getMessage()) for r in _COLLECTOR.drain()]  # drained: this test passes
    assert got == [
        ("s3fsimg.checklogs_selftest", "ERROR", "retry failed"),
        ("s3fsimg_lab.selftest", "WARNING", "lab warning"),
    ]


def test_unexpected_record_fails_the_phase_it_happens_in(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import logging
            import pytest

            log = logging.getLogger("s3fsimg.inner")

            @pytest.fixture
            def noisy_teardown():
                yield
                log.warning("teardown noise")

            def test_call():
                log.warning("cache: block %s fails its checksum", "b1")

            def test_teardown(noisy_teardown):
                pass

            def test_quiet():
                log.info("fine")
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.checklogs", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 2 passed, 1 error" in r.stdout, r.stdout
    assert "unexpected log records during call" in r.stdout
    assert "s3fsimg.inner WARNING: cache: block b1 fails its checksum" in r.stdout
    assert "unexpected log records during teardown" in r.stdout
    assert "s3fsimg.inner WARNING: teardown noise" in r.stdout
