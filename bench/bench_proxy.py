"""Benchmark of the lab proxy: boto3 GETs straight to moto vs. through ``s3fsimg_lab.proxy``.

Owns nothing the product uses; it answers one question: is the proxy the bottleneck? It starts its own moto
server and proxy, uploads small and large objects, then runs the same GET workload (8 threads) directly and
through the proxy, alternating rounds, and prints requests/s and MB/s for both with the ratio.

    .venv/bin/python bench/bench_proxy.py [--small 2000] [--large 40] [--threads 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.update({"AWS_CONFIG_FILE": "/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/creds"})

from s3fsimg_lab.moto import MotoServer, s3_client
from s3fsimg_lab.proxy import LabProxy

BUCKET = "bench-proxy"


def run(url: str, keys: list[str], threads: int) -> tuple[float, int]:
    """GET every key once with ``threads`` workers (one client per thread); return (seconds, bytes)."""
    local = threading.local()

    def client() -> Any:
        if not hasattr(local, "c"):
            local.c = s3_client(url, retries=1, response_checksum_validation="when_required")
        return local.c

    def get(key: str) -> int:
        return len(client().get_object(Bucket=BUCKET, Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: client(), range(threads * 4)))  # build clients outside the timing
        t = time.perf_counter()
        total = sum(pool.map(get, keys))
        return time.perf_counter() - t, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=2000, help="number of small GETs per round")
    ap.add_argument("--large", type=int, default=40, help="number of 1-5 MB GETs per round")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    rnd = random.Random(0)
    with MotoServer() as moto, LabProxy(moto.url) as proxy:
        setup = s3_client(moto.url)
        setup.create_bucket(Bucket=BUCKET)
        small_keys = [f"small/{i:03d}.jpg" for i in range(200)]
        for k in small_keys:
            setup.put_object(Bucket=BUCKET, Key=k, Body=rnd.randbytes(rnd.randint(2_000, 20_000)))
        large_keys = [f"large/{i:02d}.png" for i in range(8)]
        for k in large_keys:
            setup.put_object(Bucket=BUCKET, Key=k, Body=rnd.randbytes(rnd.randint(1_000_000, 5_000_000)))

        workloads = {
            "small": [small_keys[i % len(small_keys)] for i in range(args.small)],
            "large": [large_keys[i % len(large_keys)] for i in range(args.large)],
        }
        run(moto.url, workloads["small"][:200], args.threads)  # warm up both paths
        run(proxy.url, workloads["small"][:200], args.threads)

        results: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
        for _ in range(args.rounds):
            for name, keys in workloads.items():
                for target, url in (("direct", moto.url), ("proxy", proxy.url)):
                    secs, nbytes = run(url, keys, args.threads)
                    results.setdefault((name, target), []).append((secs, nbytes, len(keys)))
        counted = proxy.counts()

    print(f"threads={args.threads} rounds={args.rounds} (median round shown)")
    print(f"{'workload':<8} {'path':<7} {'req/s':>9} {'MB/s':>9}")
    summary: dict[tuple[str, str], tuple[float, float]] = {}
    for (name, target), rows in results.items():
        rps = statistics.median(n / s for s, _, n in rows)
        mbs = statistics.median(b / s / 1e6 for s, b, _ in rows)
        summary[(name, target)] = (rps, mbs)
        print(f"{name:<8} {target:<7} {rps:>9.1f} {mbs:>9.1f}")
    for name in workloads:
        d, p = summary[(name, "direct")], summary[(name, "proxy")]
        print(f"{name:<8} ratio   req/s {p[0] / d[0]:.2f}x   MB/s {p[1] / d[1]:.2f}x  (proxy / direct)")
    print(f"proxy counted {counted['requests']} requests, {counted['response_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
