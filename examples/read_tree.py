"""Open every image under a directory with Pillow (a mount's by-path/, images/, or any folder) and check
each against the sha256 the mount gives it (`user.s3fsimg.sha256`), when it has one.

    python examples/read_tree.py /mnt/ds/by-path

Prints one line: how many images were decoded, their bytes, how many were checked against their hash,
and the first image's size and format. Exit 1 when an image does not decode or does not match.
Needs only Pillow (in the project's environment and in the container image).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from PIL import Image


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    top = Path(argv[0])
    count = total = checked = 0
    first = ""
    started = time.monotonic()
    for path in sorted(p for p in top.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            want = os.getxattr(path, "user.s3fsimg.sha256").decode()
        except OSError:
            want = None
        if want is not None:
            if hashlib.sha256(data).hexdigest() != want:
                print(f"read_tree: {path}: bytes do not match sha256 {want}", file=sys.stderr)
                return 1
            checked += 1
        try:
            with Image.open(path) as im:
                im.load()
                first = first or f"{path.relative_to(top)}: {im.format} {im.size[0]}x{im.size[1]}"
        except OSError as exc:
            if want is not None:  # the mount only shows images: each must decode
                print(f"read_tree: {path}: {exc}", file=sys.stderr)
                return 1
            continue  # a non-image in a plain folder
        count += 1
        total += len(data)
    took = time.monotonic() - started
    print(f"read {count} images ({total / 1e6:.1f} MB) under {top} with Pillow in {took:.1f}s; "
          f"{checked} checked against their sha256; first: {first or 'none'}")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
