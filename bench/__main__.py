"""`just bench` / `python -m bench`: run the suites in one go and write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, Lab, Report, step
from s3fsimg_lab.images import make_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, fewer rounds (CI, < 2 minutes)")
    parser.add_argument("--only", action="append", choices=["write", "cache", "mount", "warm", "scale"],
                        help="run only these suites (repeatable)")
    parser.add_argument("--entries", type=int, default=None, help="entries of the scale manifest (1,000,000)")
    parser.add_argument("--out", type=Path, default=None, help="report path (default docs/benchmarks.md, or "
                        "bench/out/benchmarks-quick.md with --quick)")
    args = parser.parse_args(argv)
    suites = args.only or ["write", "cache", "mount", "warm", "scale"]
    default_out = ROOT / "bench" / "out" / "benchmarks-quick.md" if args.quick else ROOT / "docs" / "benchmarks.md"
    out = args.out or default_out
    report = Report(quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="s3fsimg-bench-"))
    try:
        with Lab() as lab:
            with step("generating data"):
                if args.quick:
                    data = make_dataset(work / "data", n=120, seed=3, large=6, large_bytes=(1_100_000, 3_000_000),
                                        large_format="jpg")
                else:
                    data = make_dataset(work / "data", n=300, seed=3, large=60, large_bytes=(1_100_000, 6_000_000),
                                        large_format="jpg")
            for name in suites:
                module = __import__(f"bench.{name}", fromlist=["run"])
                module.run(lab, report, args, data.root)
        report.write(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
