"""A DataLoader-style loader whose workers call `Dataset.fetch`: no mount, every image through the shared cache.

    set -a; . demo-data/demo.env; set +a                  # or a .env: the same configuration as the CLI
    python examples/fetch_loader.py                        # a plain multiprocessing loader, 4 workers
    python examples/fetch_loader.py --prefetch             # warm the cache for the epoch first
    python examples/fetch_loader.py --loader torch         # torch.utils.data.DataLoader, when torch is installed

`FetchImages` is a map-style dataset over the manifest's objects (or the ids you give it): item i is
`Dataset.fetch(ids[i])`, the local path of the verified file, opened with Pillow. A `Dataset` crosses
fork() and pickling (spawn) safely: each worker builds its own S3 client, cache and index connection
on first use, and all of them share one cache directory (an object is fetched once, whichever worker
asks first). `--prefetch` calls `Dataset.prefetch(order)` before the epoch, so the epoch reads from
disk (the same as `s3fsimg warm --from order.txt`).

Prints a JSON summary (ids in the order served, the sha256 each worker read, throughput) on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from s3fsimg import Dataset


class FetchImages:
    """Map-style dataset: item i = (RGB image, or `transform(image)`, id)."""

    def __init__(self, ids: Sequence[str] | None = None, transform: Callable[[Image.Image], Any] | None = None,
                 **config: Any) -> None:
        self.ds = Dataset.from_env(**config)
        if ids is None:  # every object once, in manifest order
            seen: dict[str, None] = {}
            for entry in self.ds.entries():
                seen.setdefault(entry.sha256)
            ids = list(seen)
        self.ids = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        path = self.ds.fetch(self.ids[index])  # a local, verified file: fetched once, then from the cache
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), self.ids[index]


# -- a plain loader: worker processes, no torch ------------------------------------------------------

_DATASET: FetchImages | None = None


def _init(dataset: FetchImages) -> None:
    global _DATASET
    _DATASET = dataset


def _load(index: int) -> tuple[str, str, tuple[int, int]]:
    """In a worker: the item's id, the sha256 of the file it read, and the decoded size."""
    assert _DATASET is not None
    image, ident = _DATASET[index]
    with open(_DATASET.ds.fetch(ident), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return ident, digest, image.size


def plain_epoch(dataset: FetchImages, order: Sequence[int], workers: int) -> list[tuple[str, str, tuple[int, int]]]:
    with multiprocessing.Pool(workers, initializer=_init, initargs=(dataset,)) as pool:
        return list(pool.imap(_load, order, chunksize=4))


# -- the same with torch -------------------------------------------------------------------------------


def to_tensor_32(image: Image.Image) -> Any:
    import torch

    small = image.resize((32, 32))
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)


def torch_epoch(order: Sequence[int], workers: int, batch_size: int = 8) -> list[str]:
    from torch.utils.data import DataLoader, Subset

    dataset = FetchImages(transform=to_tensor_32)
    loader = DataLoader(Subset(dataset, list(order)), batch_size=batch_size, num_workers=workers)
    ids: list[str] = []
    for images, batch_ids in loader:
        assert images.shape[1:] == (3, 32, 32)
        ids.extend(batch_ids)
    return ids


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loader", choices=("plain", "torch"), default="plain")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="shuffle the epoch's order with this seed")
    parser.add_argument("--prefetch", action="store_true", help="Dataset.prefetch(the epoch's order) first")
    args = parser.parse_args(argv)

    dataset = FetchImages()
    order = list(range(len(dataset)))
    if args.seed is not None:
        random.Random(args.seed).shuffle(order)
    started = time.monotonic()
    warmed = None
    if args.prefetch:
        report = dataset.ds.prefetch([dataset.ids[i] for i in order])
        warmed = {"fetched": report.fetched, "cached": report.cached, "seconds": round(report.seconds, 3)}
    dataset.ds.close()  # the workers build their own; the parent's is not needed in the epoch
    if args.loader == "torch":
        ids = torch_epoch(order, args.workers)
        digests: list[str] = []
    else:
        rows = plain_epoch(dataset, order, args.workers)
        ids = [r[0] for r in rows]
        digests = [r[1] for r in rows]
    seconds = time.monotonic() - started
    print(json.dumps({
        "loader": args.loader,
        "images": len(ids),
        "ids": ids,
        "sha256": digests,
        "prefetch": warmed,
        "images_per_second": round(len(ids) / seconds, 1) if seconds else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
