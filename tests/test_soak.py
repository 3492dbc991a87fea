"""The fault soak in its CI form (tests/soak.py; `just soak` runs the full one): a real mount and a
`Dataset` in a second process read one dataset at once, through the lab proxy cycling its faults every
0.4 s, on one cache bounded at 8 MiB, with the page cache dropped at each switch. At least 1,000 reads
under faults; none may return a wrong byte or come back short, no call may hang, and both sides must
read correctly again once the faults stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mountutil import fuse_test

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [fuse_test, pytest.mark.fuse, pytest.mark.soak]


@pytest.mark.timeout(900)
def test_no_wrong_byte_short_read_or_hang_under_cycling_faults(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--reads-per-side", "500", "--min-fault-seconds", "30",
         "--recovery-timeout", "45", "--workdir", str(tmp_path / "soak"), "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert report_path.exists(), f"the soak did not finish (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    report = json.loads(report_path.read_text())
    total = report["total"]
    assert total["reads_under_faults"] >= 1000, proc.stdout
    assert report["faults_injected"] > 0 and total["failed_cleanly"] > 0, proc.stdout  # the faults did bite
    assert report["dataset"]["with_block_map"] == report["dataset"]["over_1MiB"] > 0, proc.stdout
    for key in ("wrong_whole", "wrong_partial", "short_whole", "short_partial", "hangs", "unclean_failures"):
        assert total[key] == 0, f"{key}:\n{proc.stdout}"
    assert proc.returncode == 0, proc.stdout
