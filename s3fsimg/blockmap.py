"""Block maps: the SHA-256 of each fixed-size block of an object, so a partial read can be verified.

On S3 a map lives at `PREFIX/blocks/ab/cd/<sha256>` (`blockmap_key`, relative to the prefix like
`Entry.path`), written by the uploader for every object larger than `config.whole_object_max`,
after the object and before the manifest. Its bytes are one UTF-8 JSON object:

    {"format": "s3fsimg-blockmap-1", "sha256": "<object sha256>", "bytes": N,
     "block_size": 262144, "blocks": ["<64 lowercase hex: sha256 of block 0>", ...]}

Block i covers bytes [i * block_size, min((i + 1) * block_size, bytes)), and
len(blocks) == ceil(bytes / block_size) (0 blocks for an empty object).

A map is a fact of its object: `from_bytes` checks it against the manifest entry's sha256 and size
and raises only `IntegrityError` for any input whatsoever (a map comes from the network).
A reader uses a map only when its block_size is the reader's own.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from s3fsimg.errors import IntegrityError

FORMAT = "s3fsimg-blockmap-1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 20
# A block size outside this range is refused: it would make absurd maps (or a huge block count).
_MIN_BLOCK_SIZE = 1
_MAX_BLOCK_SIZE = 1 << 40


def blockmap_key(sha256: str) -> str:
    """The map's key relative to the dataset prefix: `blocks/ab/cd/<sha256>`."""
    return f"blocks/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def _block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def encoded_size(sha256: str, size: int, block_size: int) -> int:
    """The length of what `BlockMap.to_bytes` gives for such an object, known without its bytes (the
    uploader's "is the map there" check)."""
    return len(BlockMap(sha256, size, block_size, (bytes(32),) * _block_count(size, block_size)).to_bytes())


@dataclass(frozen=True)
class BlockMap:
    """The per-block SHA-256 digests of one object (`digests[i]` is the raw 32-byte digest of block i)."""

    sha256: str
    size: int
    block_size: int
    digests: tuple[bytes, ...]

    def block_count(self) -> int:
        return len(self.digests)

    def block_bounds(self, index: int) -> tuple[int, int]:
        """[start, end) of block `index`; IndexError outside 0..block_count()-1."""
        if not 0 <= index < len(self.digests):
            raise IndexError(f"block {index} of an object with {len(self.digests)} blocks")
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)

    def check_block(self, index: int, data: bytes | memoryview) -> bool:
        """True when `data` is exactly block `index`: its length and its SHA-256."""
        if not 0 <= index < len(self.digests):
            return False
        start, end = self.block_bounds(index)
        if len(data) != end - start:
            return False
        return hashlib.sha256(data).digest() == self.digests[index]

    def to_bytes(self) -> bytes:
        document = {
            "format": FORMAT,
            "sha256": self.sha256,
            "bytes": self.size,
            "block_size": self.block_size,
            "blocks": [digest.hex() for digest in self.digests],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, *, sha256: str, size: int) -> BlockMap:
        """Parse a map fetched for the object (`sha256`, `size`) of a manifest entry.

        Raises IntegrityError("block map of <sha>: <what is wrong>") when the bytes are not a valid
        map or describe another object; never any other exception, whatever `raw` holds."""

        def bad(what: str) -> IntegrityError:
            return IntegrityError(f"block map of {sha256}: {what}")

        try:
            document = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError, TypeError, MemoryError) as error:
            raise bad(f"not a JSON document ({type(error).__name__})") from None
        if not isinstance(document, dict):
            raise bad("not a JSON object")
        if document.get("format") != FORMAT:
            raise bad(f"format is not {FORMAT}")
        map_sha256 = document.get("sha256")
        if not isinstance(map_sha256, str) or map_sha256 != sha256:
            raise bad("sha256 differs from the entry's")
        map_size = document.get("bytes")
        if type(map_size) is not int or map_size != size:
            raise bad("bytes differs from the entry's size")
        block_size = document.get("block_size")
        if type(block_size) is not int or not _MIN_BLOCK_SIZE <= block_size <= _MAX_BLOCK_SIZE:
            raise bad("block_size is not a positive integer")
        blocks = document.get("blocks")
        if not isinstance(blocks, list):
            raise bad("blocks is not a list")
        expected = _block_count(size, block_size) if size >= 0 else -1
        if len(blocks) != expected:
            raise bad(f"{len(blocks)} blocks where {max(expected, 0)} were expected")
        digests = []
        for block in blocks:
            if not isinstance(block, str) or not _HEX64.fullmatch(block):
                raise bad("a block digest is not 64 lowercase hex digits")
            digests.append(bytes.fromhex(block))
        return cls(sha256=sha256, size=size, block_size=block_size, digests=tuple(digests))

    @classmethod
    def of_bytes(cls, data: bytes, *, block_size: int) -> BlockMap:
        """The map of an object held in memory (its sha256 computed too)."""
        view = memoryview(data)
        digests = tuple(
            hashlib.sha256(view[start : start + block_size]).digest() for start in range(0, len(view), block_size)
        )
        return cls(sha256=hashlib.sha256(view).hexdigest(), size=len(view), block_size=block_size, digests=digests)

    @classmethod
    def of_file(cls, path: Path, *, block_size: int) -> BlockMap:
        """The map of a file, read once in a streaming way (memory: one block at a time).

        A buffered `read(n)` of a regular file returns n bytes unless end of file comes first."""
        whole = hashlib.sha256()
        digests = []
        size = 0
        with open(path, "rb") as file:
            while block := file.read(block_size):
                whole.update(block)
                digests.append(hashlib.sha256(block).digest())
                size += len(block)
        return cls(sha256=whole.hexdigest(), size=size, block_size=block_size, digests=tuple(digests))
