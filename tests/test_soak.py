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
from tests.soak import Results, SoakConfig, analyse, judge

ROOT = Path(__file__).resolve().parent.parent



@fuse_test
@pytest.mark.fuse
@pytest.mark.soak
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


# -- the harness's own judgement, on made-up reads (no lab) ------------------------------------------------


def test_judge_tells_correct_wrong_and_short_reads() -> None:
    data = bytes(range(256)) * 1000
    assert judge(data, data) == ("correct", None)
    flipped = bytearray(data)
    flipped[200_000] ^= 0xFF
    assert judge(bytes(flipped), data) == ("wrong", 200_000)
    assert judge(data[:1000], data) == ("short", None)
    assert judge(bytes(flipped)[:250_000], data) == ("wrong", 200_000)  # short and wrong: wrong
    assert judge(data + b"x", data) == ("wrong", len(data))  # more than the object has


def read(status: str, start: float, end: float, *, slowest: float = 0.1, kind: str = "whole") -> dict[str, object]:
    return {"type": "read", "side": "mount", "kind": kind, "sha": "ab" * 32, "size": 10, "map": False,
            "offset": 0, "asked": 10, "expected": 10, "got": 10, "diff": None, "status": status, "error": None,
            "start": start, "end": end, "slowest": slowest}


def test_analyse_counts_hangs_unfinished_calls_and_the_time_to_recover(tmp_path: Path) -> None:
    config = SoakConfig(read_deadline=3.0, hang_margin=5.0, recovery_timeout=60)
    mount, api = Results(tmp_path / "m"), Results(tmp_path / "a")
    mount.records = [read("correct", 1, 2), read("failed", 2, 11, slowest=8.5), read("short", 3, 4, kind="partial"),
                     read("failed", 100.5, 103.0), read("correct", 104, 105)]
    mount.end = {"unfinished": [{"thread": 3, "call": "whole abc: read at 0", "seconds": 30.0}]}
    api.records = [read("wrong", 5, 6), read("correct", 101, 102)]
    api.end = {"unfinished": []}
    switches = [{"at": 0.0, "kind": "hang", "scope": "all", "value": None, "keys": [], "applied": 4},
                {"at": 0.4, "kind": "refuse", "scope": "all", "value": None, "keys": [], "applied": 0}]
    run_info = {"cleared": 100.0, "switches": switches, "recovered": {"mount": True, "api": True},
                "fault_phase_timed_out": False}
    report = analyse(config, {"mount": mount, "api": api}, run_info, {})
    assert report["sides"]["mount"]["hangs"] == 2  # 8.5 s > 3 + 5, and the call that never returned
    assert report["total"]["short_partial"] == 1 and report["total"]["wrong_whole"] == 1
    assert report["recovery_seconds"] == 3.0  # the failed read that started after the faults stopped
    assert report["refused_windows"] == 1 and report["faults_injected"] == 4
    assert not report["ok"]
    assert report["failures"] == ["1 wrong whole", "1 short partial", "2 hangs"]
