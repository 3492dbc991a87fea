"""Deterministic sample image datasets for tests and benchmarks (Pillow only, no network).

Owns :func:`make_dataset` (a nested folder of real JPEG/PNG/WebP/GIF files with byte-identical copies,
non-image decoys and a logical-map CSV written next to the folder), :func:`make_large_image` (1–6 MB
noise images of a chosen size, for cache and benchmark work) and the :class:`SampleSet` /
:class:`SampleFile` description of what was written. Same arguments, same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "tif": "image/tiff",
}
_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "tif": "TIFF"}
_FOLDERS = (
    "cats/indoor",
    "cats/outdoor",
    "cats/outdoor/night",
    "dogs",
    "dogs/puppies/small",
    "birds/sea",
    "birds/forest",
    "misc",
)


@dataclass(frozen=True)
class SampleFile:
    """One file written under the dataset root."""

    rel: str  # POSIX path relative to the root
    path: Path
    size: int
    sha256: str
    is_image: bool
    content_type: str | None = None  # image/jpeg, ... (None for non-images)
    width: int | None = None
    height: int | None = None
    duplicate_of: str | None = None  # rel of the earlier file with the same bytes
    logical_id: str | None = None  # id given to it by the map CSV

    @property
    def ext(self) -> str | None:
        """Manifest extension for the content type: jpg, png, webp, gif, tif."""
        return {v: k for k, v in CONTENT_TYPES.items() if k != "jpeg"}.get(self.content_type or "")

    @property
    def s3_path(self) -> str | None:
        """``images/ab/cd/<sha256>.<ext>`` per the contract's S3 layout (None for non-images)."""
        if not self.is_image:
            return None
        return f"images/{self.sha256[:2]}/{self.sha256[2:4]}/{self.sha256}.{self.ext}"


@dataclass
class SampleSet:
    """What :func:`make_dataset` wrote."""

    root: Path
    files: list[SampleFile]
    map_path: Path | None
    seed: int
    extras: dict[str, object] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    def copy_to(self, root: Path, map_path: Path | None = None) -> SampleSet:
        """Copy the tree (and the map, to ``map_path`` or beside the new root); return the copy's description."""
        shutil.copytree(self.root, root)
        new_map: Path | None = None
        if self.map_path is not None:
            new_map = map_path or root.parent / f"{root.name}.map.csv"
            shutil.copyfile(self.map_path, new_map)
        files = [dataclasses.replace(f, path=root / f.rel) for f in self.files]
        return SampleSet(root=root, files=files, map_path=new_map, seed=self.seed, extras=dict(self.extras))

    @property
    def by_rel(self) -> dict[str, SampleFile]:
        return {f.rel: f for f in self.files}

    @property
    def images(self) -> list[SampleFile]:
        """Every image file (copies included)."""
        return [f for f in self.files if f.is_image]

    @property
    def non_images(self) -> list[SampleFile]:
        """Files a scanner must skip (text, fake .jpg, empty file)."""
        return [f for f in self.files if not f.is_image]

    @property
    def distinct_images(self) -> dict[str, SampleFile]:
        """sha256 -> first image with those bytes (what ends up as one S3 object)."""
        out: dict[str, SampleFile] = {}
        for f in self.images:
            out.setdefault(f.sha256, f)
        return out

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        """(original rel, copy rel) pairs of byte-identical images."""
        return [(f.duplicate_of, f.rel) for f in self.files if f.duplicate_of is not None]

    @property
    def logical_ids(self) -> dict[str, str]:
        """rel -> logical_id for every file the map names."""
        return {f.rel: f.logical_id for f in self.files if f.logical_id is not None}

    @property
    def large(self) -> list[SampleFile]:
        """The large images (under ``large/``)."""
        return [f for f in self.images if f.rel.startswith("large/")]

    @property
    def total_image_bytes(self) -> int:
        """Bytes of the distinct images (what an upload sends)."""
        return sum(f.size for f in self.distinct_images.values())


def _small_image(rnd: random.Random, w: int, h: int) -> Image.Image:
    """A smooth random picture: upscaled colour noise plus a few shapes."""
    gw, gh = rnd.randint(2, 12), rnd.randint(2, 12)
    base = Image.frombytes("RGB", (gw, gh), rnd.randbytes(gw * gh * 3))
    img = base.resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rnd.randint(0, 4)):
        x0, y0 = rnd.randrange(w), rnd.randrange(h)
        x1, y1 = min(w - 1, x0 + rnd.randint(1, w)), min(h - 1, y0 + rnd.randint(1, h))
        colour = tuple(rnd.randrange(256) for _ in range(3))
        if rnd.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=2)
    return img


def _encode(img: Image.Image, ext: str, rnd: random.Random) -> bytes:
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[ext]
    if fmt == "JPEG":
        img.save(buf, fmt, quality=rnd.randint(60, 95))
    elif fmt == "PNG":
        img.save(buf, fmt, compress_level=1)
    elif fmt == "WEBP":
        img.save(buf, fmt, quality=rnd.randint(50, 90), method=0)
    elif fmt == "GIF":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, fmt)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def noise_image_bytes(target_bytes: int, seed: int = 0, fmt: str = "png") -> tuple[bytes, int, int]:
    """Encode a random-noise image of about ``target_bytes`` (±5 %); return (bytes, width, height).

    PNG of noise is incompressible, so its size is ~3 bytes per pixel and exact to within a few hundred
    bytes; JPEG (quality 95) is calibrated with one trial encode.
    """
    fmt = fmt.lower()
    rnd = random.Random(f"noise-{seed}-{target_bytes}-{fmt}")

    def encode(pixels: int) -> tuple[bytes, int, int]:
        w = max(16, int(pixels**0.5 * 4 / 3))
        h = max(16, pixels // w)
        img = Image.frombytes("RGB", (w, h), rnd.randbytes(w * h * 3))
        buf = io.BytesIO()
        if fmt == "png":
            img.save(buf, "PNG", compress_level=0)
        elif fmt in ("jpg", "jpeg"):
            img.save(buf, "JPEG", quality=95)
        else:
            raise ValueError(f"large images are png or jpg, not {fmt!r}")
        return buf.getvalue(), w, h

    guess = max(256, target_bytes // 3)
    data, w, h = encode(guess)
    if abs(len(data) - target_bytes) > target_bytes * 0.05:
        data, w, h = encode(max(256, int(guess * target_bytes / len(data))))
    return data, w, h


def make_large_image(path: Path, target_bytes: int = 2_000_000, seed: int = 0, fmt: str = "png") -> SampleFile:
    """Write a noise image of about ``target_bytes`` at ``path`` (parents created); deterministic by seed."""
    data, w, h = noise_image_bytes(target_bytes, seed, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ext = "jpg" if fmt.lower() in ("jpg", "jpeg") else "png"
    return SampleFile(
        rel=path.name,
        path=path,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        is_image=True,
        content_type=CONTENT_TYPES[ext],
        width=w,
        height=h,
    )


def make_dataset(
    root: Path,
    n: int = 300,
    seed: int = 0,
    large: int = 0,
    *,
    large_bytes: tuple[int, int] = (1_000_000, 6_000_000),
    large_format: str = "png",
    formats: Sequence[tuple[str, float]] = (("jpg", 0.6), ("png", 0.3), ("webp", 0.05), ("gif", 0.05)),
    max_side: int = 384,
    duplicates: int | None = None,
    decoys: bool = True,
    odd_names: bool = True,
    map_fraction: float = 0.8,
    map_path: Path | None = None,
) -> SampleSet:
    """Write a deterministic sample dataset under ``root`` and describe it.

    * ``n`` small images (16..``max_side`` px per side) spread over nested folders (``cats/indoor/…``),
      formats drawn from ``formats`` (extension, weight);
    * ``duplicates`` byte-identical copies of earlier images under other names (default ~3 % of ``n``);
    * ``large`` noise images of ``large_bytes`` (min, max) bytes under ``large/``, in ``large_format``;
    * decoys (``decoys=True``): ``notes.txt``, ``misc/not_really.jpg`` (text), ``misc/empty.png`` (0 bytes),
      ``cats/.DS_Store``;
    * ``odd_names``: one image with a space and one with non-ASCII letters in its name;
    * a map CSV (header ``filename,logical_id``, ids ``DAO-00012``) for ``map_fraction`` of the images,
      mostly by relative path and every fifth by basename, written to ``map_path`` (default:
      ``<root>.map.csv`` beside ``root``, never inside it). ``map_fraction=0`` writes no map.
    """
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    exts = [e for e, _ in formats]
    weights = [w for _, w in formats]
    files: list[SampleFile] = []

    def write(rel: str, data: bytes, **meta: object) -> SampleFile:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        sf = SampleFile(rel=rel, path=p, size=len(data), sha256=hashlib.sha256(data).hexdigest(), **meta)  # type: ignore[arg-type]
        files.append(sf)
        return sf

    for i in range(1, n + 1):
        ext = rnd.choices(exts, weights)[0]
        w, h = rnd.randint(16, max_side), rnd.randint(16, max_side)
        img = _small_image(rnd, w, h)
        data = _encode(img, ext, rnd)
        folder = rnd.choice(_FOLDERS)
        name = f"img_{i:04d}.{ext}"
        if odd_names and i == 2:
            name = f"img {i:04d} with space.{ext}"
        elif odd_names and i == 3:
            name = f"café_{i:04d}.{ext}"
        write(f"{folder}/{name}", data, is_image=True, content_type=CONTENT_TYPES[ext], width=w, height=h)

    n_dup = max(1, n // 33) if duplicates is None else duplicates
    originals = list(files)
    for j in range(min(n_dup, len(originals))):
        src = originals[rnd.randrange(len(originals))]
        folder = rnd.choice([f for f in _FOLDERS if not src.rel.startswith(f + "/")])
        ext = src.rel.rsplit(".", 1)[1]
        write(
            f"{folder}/copy_{j:03d}_of_{Path(src.rel).stem.replace(' ', '_')}.{ext}",
            src.path.read_bytes(),
            is_image=True,
            content_type=src.content_type,
            width=src.width,
            height=src.height,
            duplicate_of=src.rel,
        )

    lo, hi = large_bytes
    for k in range(large):
        target = rnd.randint(lo, hi)
        data, w, h = noise_image_bytes(target, seed * 1000 + k, large_format)
        ext = "jpg" if large_format.lower() in ("jpg", "jpeg") else "png"
        write(f"large/big_{k:03d}.{ext}", data, is_image=True, content_type=CONTENT_TYPES[ext], width=w, height=h)

    if decoys:
        write("notes.txt", b"Sample dataset for s3fsimg tests.\nNot an image.\n", is_image=False)
        write("misc/not_really.jpg", b"This file has a .jpg name but is plain text.\n" * 3, is_image=False)
        write("misc/empty.png", b"", is_image=False)
        write("cats/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64), is_image=False)

    # Logical map: by relative path mostly, every fifth by basename (only where the basename is unique).
    out_map: Path | None = None
    if map_fraction > 0:
        out_map = map_path or root.parent / f"{root.name}.map.csv"
        basenames: dict[str, int] = {}
        for f in files:
            basenames[Path(f.rel).name] = basenames.get(Path(f.rel).name, 0) + 1
        rows: list[tuple[str, str]] = []
        next_id = 1
        for idx, f in enumerate(files):
            if not f.is_image or rnd.random() >= map_fraction:
                continue
            lid = f"DAO-{next_id:05d}"
            next_id += 1
            base = Path(f.rel).name
            key = base if idx % 5 == 0 and basenames[base] == 1 else f.rel
            rows.append((key, lid))
            files[idx] = dataclasses.replace(f, logical_id=lid)
        out_map.parent.mkdir(parents=True, exist_ok=True)
        with out_map.open("w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh)
            wr.writerow(["filename", "logical_id"])
            wr.writerows(rows)

    return SampleSet(root=root, files=files, map_path=out_map, seed=seed)
