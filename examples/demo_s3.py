"""A local S3 server with an empty demo bucket, sample images to upload to it, and the settings to reach it.

For the README's quick start and container walk-through, on a machine with no S3 at hand:

    .venv/bin/python examples/demo_s3.py &        # "ready" after a few seconds; `kill %1` stops it
    until [ -e demo-data/demo.env ]; do sleep 1; done

It starts moto's S3 server on 127.0.0.1:9000 (`--port`), creates the bucket `demo-images`, writes
sample images with Pillow under demo-data/images/ (a nested tree: cats/, dogs/, birds/, misc/, with a
few copies, non-image decoys, and a logical map demo-data/images.map.csv), and, once everything is
ready, demo-data/demo.env: the variables that reach the server (the bucket, the endpoint, path-style
addressing, throwaway credentials). `set -a; . demo-data/demo.env; set +a` puts them in a shell;
`docker run --env-file demo-data/demo.env` in a container (with `--network host`: the server listens
on the loopback only). The server stops with this program (Ctrl-C, SIGTERM); its data is in memory.

Needs the development environment (`bash scripts/bootstrap.sh`): moto and the test lab's image maker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from s3fsimg_lab.images import make_dataset
from s3fsimg_lab.moto import MotoServer, s3_client

BUCKET = "demo-images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (default 9000)")
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where images and demo.env go")
    parser.add_argument("--images", type=int, default=200, help="how many sample images (default 200)")
    args = parser.parse_args()

    out: Path = args.dir
    env_file = out / "demo.env"
    with contextlib.suppress(FileNotFoundError):
        env_file.unlink()  # written again once the server is ready: its presence means "ready"
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    map_csv = out / "images.map.csv"
    if not images.is_dir():
        make_dataset(images, n=args.images, seed=1, large=2, large_bytes=(1_200_000, 2_500_000), map_path=map_csv)

    server = MotoServer(port=args.port)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"demo_s3: cannot start the S3 server on 127.0.0.1:{args.port} (is the port taken? --port): "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        s3_client(server.url).create_bucket(Bucket=BUCKET)
        settings = {
            "S3_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": server.url,
            "S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": "demo",
            "AWS_SECRET_ACCESS_KEY": "demo-secret",
            "AWS_REGION": "us-east-1",
        }
        tmp = env_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        os.replace(tmp, env_file)
        print(f"demo_s3: ready: S3 on {server.url}, empty bucket {BUCKET}; images in {images} "
              f"(logical map {map_csv}); settings in {env_file}. Ctrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            env_file.unlink()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
