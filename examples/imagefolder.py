"""An ImageFolder-shaped dataset over a mount's by-path/ tree, read by worker processes.

    s3fsimg mount /mnt/ds
    python examples/imagefolder.py /mnt/ds                    # a plain multiprocessing loader
    python examples/imagefolder.py /mnt/ds --loader torch     # torch.utils.data.DataLoader, when torch is installed

`MountImageFolder` is what torchvision's `ImageFolder` does, without torchvision: the classes are the
top-level directories of by-path/ (the uploaded directory's own tree), the samples every image file
under each (recursively, sorted), the target the class index. Listing the mount never touches S3
(names and sizes come from the manifest), so building the sample list of a million images costs
only the walk; each worker opens its files through the mount, which fetches them (or reads them from
the cache, after `s3fsimg warm`). torchvision's ImageFolder works on the mount as well; this class only
spares the dependency.

Prints a JSON summary (images, classes, per-class counts, targets, throughput) on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

#: torchvision's IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class MountImageFolder:
    """Map-style dataset: item i = (RGB image, or `transform(image)`, class index)."""

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Image.Image], Any] | None = None) -> None:
        top = Path(root)
        if (top / "by-path").is_dir():  # the mountpoint itself: use its by-path/ tree
            top = top / "by-path"
        self.root = top
        self.transform = transform
        self.classes = sorted(e.name for e in os.scandir(top) if e.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for cls in self.classes:
            for dirpath, dirnames, filenames in os.walk(top / cls):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[cls]))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), target


# -- a plain loader: worker processes, no torch ------------------------------------------------------

_DATASET: MountImageFolder | None = None


def _init(dataset: MountImageFolder) -> None:
    global _DATASET
    _DATASET = dataset


def _load(index: int) -> tuple[int, int, tuple[int, int]]:
    """In a worker: decode item `index`; what a training step would get, summarised (target, size)."""
    assert _DATASET is not None
    image, target = _DATASET[index]
    return index, target, image.size


def plain_epoch(dataset: MountImageFolder, workers: int) -> list[tuple[int, int, tuple[int, int]]]:
    """One pass over the dataset in order, decoded by `workers` processes (as a DataLoader does)."""
    with multiprocessing.Pool(workers, initializer=_init, initargs=(dataset,)) as pool:
        return list(pool.imap(_load, range(len(dataset)), chunksize=8))


# -- the same with torch -------------------------------------------------------------------------------


def to_tensor_32(image: Image.Image) -> Any:
    """A 3x32x32 uint8 tensor (fixed size, so the default collate can stack a batch)."""
    import torch

    small = image.resize((32, 32))
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)


def torch_epoch(root: str, workers: int, batch_size: int = 16) -> list[int]:
    from torch.utils.data import DataLoader

    dataset = MountImageFolder(root, transform=to_tensor_32)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    targets: list[int] = []
    for images, batch_targets in loader:
        assert images.shape[1:] == (3, 32, 32)
        targets.extend(int(t) for t in batch_targets)
    return targets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a mountpoint (its by-path/ is used) or any ImageFolder-shaped directory")
    parser.add_argument("--loader", choices=("plain", "torch"), default="plain")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)

    started = time.monotonic()
    dataset = MountImageFolder(args.root)
    listed = time.monotonic() - started
    if args.loader == "torch":
        targets = torch_epoch(args.root, args.workers)
        sizes: list[tuple[int, int]] = []
    else:
        rows = plain_epoch(dataset, args.workers)
        targets = [t for _, t, _ in rows]
        sizes = [s for _, _, s in rows]
    seconds = time.monotonic() - started
    counts = Counter(dataset.classes[t] for t in targets)
    print(json.dumps({
        "loader": args.loader,
        "root": str(dataset.root),
        "images": len(targets),
        "classes": dataset.classes,
        "per_class": dict(sorted(counts.items())),
        "paths": [os.path.relpath(p, dataset.root) for p, _ in dataset.samples],
        "targets": targets,
        "sizes": sizes,
        "list_seconds": round(listed, 3),
        "images_per_second": round(len(targets) / seconds, 1) if seconds else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
