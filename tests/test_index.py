"""The on-disk index: layout, inode rules, read API, atomic build, errors with line numbers, reuse."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.errors import ManifestError, NotFound
from s3fsimg.index import (
    BY_ID_INODE,
    BY_PATH_INODE,
    IMAGES_INODE,
    INDEXES,
    MANIFEST_INODE,
    OBJ_BASE,
    ROOT_INODE,
    Attr,
    Index,
)
from s3fsimg.index_build import build_index
from s3fsimg.index_load import ensure_index
from s3fsimg.manifest import Entry, object_path
from tests.mountutil import fake_manifest


def sha(i: int) -> str:
    import hashlib

    return hashlib.sha256(f"obj{i}".encode()).hexdigest()


def entry(i: int, **kw: object) -> dict[str, object]:
    s = sha(i)
    d: dict[str, object] = {"sha256": s, "path": object_path(s, "image/png"), "bytes": 100 + i,
                            "content_type": "image/png"}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


def write(path: Path, lines: list[dict[str, object] | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Index]:
    m = write(tmp_path / "m.jsonl", [
        entry(0, logical_id="A", source_path="cats/a.png", width=3, height=4, etag='"e0"'),
        entry(1, logical_id="B", source_path="dogs/deep/b.png"),
        entry(0, logical_id="C", source_path="copies/a.png"),  # same object, two more names
        "",  # blank line
        entry(2),  # no id, no path
        entry(3, logical_id="A"),  # a second object under id A
    ])
    dest = tmp_path / "idx.sqlite"
    build_index(m, dest, manifest_digest="d" * 64, mtime_ns=123)
    index = Index.open(dest, manifest_digest="d" * 64)
    yield index
    index.close()


def attr_of(index: Index, inode: int) -> Attr:
    """The attributes of an inode the test expects to exist."""
    attr = index.getattr(inode)
    assert attr is not None, inode
    return attr


def walk(index: Index, inode: int = ROOT_INODE, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    listing = list(index.readdir(inode))
    for i, (_name, _child, key) in enumerate(listing[:50]):  # resuming after a key gives exactly the rest
        assert list(index.readdir(inode, key)) == listing[i + 1:]
    for name, child, _key in listing:
        path = f"{prefix}{name.decode()}"
        attr = index.getattr(child)
        assert attr is not None
        assert index.lookup(inode, name) == child, path
        if attr.is_dir:
            assert index.lookup(child, b"..") == inode
            out.update(walk(index, child, path + "/"))
        else:
            out[path] = child
    return out


def test_layout_names_and_inodes(small: Index) -> None:
    files = walk(small)
    a, b, c, d = (object_path(sha(i), "image/png") for i in range(4))
    base = lambda p: p.rsplit("/", 1)[1]  # noqa: E731
    assert set(files) == {a, b, c, d, "manifest.jsonl",
                          f"by-id/A/{base(a)}", f"by-id/A/{base(d)}", f"by-id/B/{base(b)}", f"by-id/C/{base(a)}",
                          "by-path/cats/a.png", "by-path/dogs/deep/b.png", "by-path/copies/a.png"}
    # one inode per object, shared by all its names; nlink counts them
    ino = files[a]
    assert files["by-path/cats/a.png"] == files["by-path/copies/a.png"] == files[f"by-id/C/{base(a)}"] == ino
    assert attr_of(small, ino).nlink == 5  # images + by-id A + by-id C + 2 by-path
    assert attr_of(small, files[c]).nlink == 1
    assert attr_of(small, ino).size == 100
    assert small.object_for_inode(ino).sha256 == sha(0)
    assert attr_of(small, MANIFEST_INODE).size == small.manifest_bytes
    assert small.entry_count() == 5 and small.object_count() == 4
    assert small.name_count() == len(files)
    assert small.mtime_ns == 123


def test_lookup_misses(small: Index) -> None:
    assert small.lookup(ROOT_INODE, b"nope") is None
    assert small.lookup(IMAGES_INODE, b"zz") is None
    assert small.lookup(IMAGES_INODE, b"0") is None
    assert small.lookup(BY_ID_INODE, b"Z") is None
    assert small.lookup(BY_PATH_INODE, b"cats/a.png") is None
    a = object_path(sha(0), "image/png").split("/")
    ab = small.lookup(IMAGES_INODE, a[1].encode())
    assert ab is not None
    cd = small.lookup(ab, a[2].encode())
    assert cd is not None
    assert small.lookup(cd, a[3].encode()) is not None
    assert small.lookup(cd, a[3].replace(".png", ".jpg").encode()) is None
    assert small.lookup(cd, sha(1).encode() + b".png") is None  # exists elsewhere, not in this dir
    assert small.getattr(10**12) is None
    with pytest.raises(NotFound):
        small.object_for_inode(IMAGES_INODE)


def test_inodes_that_are_not_there_and_names_that_are_not_listed(small: Index) -> None:
    """Each kind of inode answers for numbers in its range that name nothing (no attributes, no names, no
    listing, no parent), and a lookup finds only the names readdir lists."""
    used_ab = {int(sha(i)[:2], 16) for i in range(4)}
    free_ab = min(set(range(256)) - used_ab)
    ab = int(sha(0)[:2], 16)
    free_abcd = min(set(range(ab << 8, (ab + 1) << 8)) - {int(sha(i)[:4], 16) for i in range(4)})
    ab_base, abcd_base = 16, 16 + 256  # the numbering of images/ab and images/ab/cd
    assert small.lookup(IMAGES_INODE, f"{ab:02x}".encode()) == ab_base + ab
    absent = [
        6, 15, abcd_base + 0x10000, OBJ_BASE - 1,  # between the ranges
        ab_base + free_ab, abcd_base + free_abcd,  # images/ab and images/ab/cd that hold no object
        OBJ_BASE + 2,  # a later line of object 0 is not an inode of its own
        small.iddir_base + 3, small.iddir_base + 4,  # no logical id; not the first line with id A
        small.pdir_base, small.pdir_base + 6, small.pdir_base + 10**6,  # by-path directories are 1..4
    ]
    for inode in absent:
        assert small.getattr(inode) is None, inode
        assert small.parent(inode) is None, inode
        assert list(small.readdir(inode)) == [], inode
        assert small.lookup(inode, b".") is None and small.lookup(inode, b"..") is None, inode
        assert small.xattrs(inode) == {}, inode
    assert small.lookup(small.iddir_base + 4, f"{sha(3)}.png".encode()) is None  # by-id/A/<sha3> is in iddir 0
    assert small.lookup(small.iddir_base, f"{sha(3)}.png".encode()) is not None
    # files: no names in them, no parent; manifest.jsonl is a file of the root
    for file_inode in (MANIFEST_INODE, OBJ_BASE):
        assert small.lookup(file_inode, b".") is None and small.parent(file_inode) is None
        assert small.lookup(file_inode, b"x") is None and list(small.readdir(file_inode)) == []
    assert small.lookup(ROOT_INODE, b"manifest.jsonl") == MANIFEST_INODE
    assert small.lookup(ROOT_INODE, b"..") == ROOT_INODE and small.lookup(BY_PATH_INODE, b"..") == ROOT_INODE
    # names: only as listed (lowercase hex), and not-UTF-8 names are simply absent
    images_cd = abcd_base + int(sha(0)[:4], 16)
    listed = f"{sha(0)}.png".encode()
    for parent in (images_cd, small.iddir_base):  # images/ab/cd/ and by-id/A/
        assert small.lookup(parent, listed) == OBJ_BASE
        assert small.lookup(parent, listed[:64].upper() + b".png") is None
    assert small.lookup(BY_ID_INODE, b"\xff") is None and small.lookup(BY_PATH_INODE, b"\xff") is None


def test_indexes_are_named_as_built(small: Index) -> None:
    """The build creates each index of `INDEXES` by its name, and no other."""
    import sqlite3

    with sqlite3.connect(f"file:{small.path}?mode=ro", uri=True) as db:
        built = {name: sql for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type='index' "
                                                       "AND sql IS NOT NULL")}
    assert built == INDEXES


def test_entries_xattrs_and_ids(small: Index) -> None:
    first = small.nth_entry(0)
    assert first == Entry(sha256=sha(0), path=object_path(sha(0), "image/png"), bytes=100,
                          content_type="image/png", width=3, height=4, logical_id="A", etag='"e0"',
                          source_path="cats/a.png")
    assert [e.logical_id for e in small.iter_entries()] == ["A", "B", "C", None, "A"]
    with pytest.raises(IndexError):
        small.nth_entry(5)
    b = small.by_sha256(sha(1))
    assert b is not None and b.logical_id == "B"
    assert small.by_sha256("0" * 64) is None
    c = small.by_logical_id("C")
    assert c is not None and c.sha256 == sha(0)
    assert small.by_logical_id("nope") is None
    ino0, ino2 = small.inode_for_sha256(sha(0)), small.inode_for_sha256(sha(2))
    assert ino0 is not None and ino2 is not None
    x = small.xattrs(ino0)
    assert x == {"user.s3fsimg.sha256": sha(0).encode(), "user.s3fsimg.logical_id": b"A",
                 "user.s3fsimg.width": b"3", "user.s3fsimg.height": b"4",
                 "user.s3fsimg.content_type": b"image/png", "user.s3fsimg.etag": b'"e0"'}
    assert small.xattrs(ino2) == {"user.s3fsimg.sha256": sha(2).encode(),
                                  "user.s3fsimg.content_type": b"image/png"}
    assert small.xattrs(ROOT_INODE) == {}



def test_xattrs_are_per_object_each_from_its_first_line_that_has_it(tmp_path: Path) -> None:
    """An object named on several lines is one inode: its xattrs do not depend on which line came first."""
    m = write(tmp_path / "m.jsonl", [
        entry(0, source_path="plain/a.png"),  # line 1 of object 0: no logical_id, width, height or etag
        entry(1, logical_id="other", width=9, height=9, etag='"e1"'),  # another object in between
        entry(0, logical_id="L2", width=3, etag='"e0"', source_path="named/a.png"),  # line 2: most of them
        entry(0, logical_id="L3", height=4, etag='"e0"'),  # line 3: a later id (not taken), the height
        entry(2, source_path="bare.png"),  # an object that never has them
        entry(2, source_path="bare2.png"),
        entry(0, logical_id="L4"),  # a later line of object 0 with no etag of its own
    ])
    build_index(m, tmp_path / "idx.sqlite", manifest_digest="d" * 64, mtime_ns=1)
    with Index.open(tmp_path / "idx.sqlite") as index:
        files = walk(index)
        ino = files[object_path(sha(0), "image/png")]
        names = ["by-path/plain/a.png", "by-path/named/a.png", f"by-id/L2/{sha(0)}.png", f"by-id/L3/{sha(0)}.png"]
        assert {files[n] for n in names} == {ino}
        assert index.xattrs(ino) == {"user.s3fsimg.sha256": sha(0).encode(), "user.s3fsimg.logical_id": b"L2",
                                     "user.s3fsimg.width": b"3", "user.s3fsimg.height": b"4",
                                     "user.s3fsimg.content_type": b"image/png", "user.s3fsimg.etag": b'"e0"'}
        assert index.xattrs(files[object_path(sha(2), "image/png")]) == {
            "user.s3fsimg.sha256": sha(2).encode(), "user.s3fsimg.content_type": b"image/png"}
        assert index.xattrs(files[object_path(sha(1), "image/png")])["user.s3fsimg.logical_id"] == b"other"
        # a later line of an object is not an inode of its own
        assert index.xattrs(OBJ_BASE + 2) == {} and index.xattrs(index.iddir_base) == {}
        # what the reader checks S3's responses against: the object's etag, whichever line gave it
        assert index.object_for_inode(ino).etag == '"e0"'
        by_hash = index.by_sha256(sha(0))
        assert by_hash is not None and by_hash.etag == '"e0"' and by_hash.source_path == "plain/a.png"
        assert index.object_for_inode(files[object_path(sha(2), "image/png")]).etag is None
        by_id = index.by_logical_id("L4")  # a later line of the object, without an etag of its own...
        assert by_id is not None and by_id.logical_id == "L4" and by_id.etag == '"e0"'  # ...has the object's
        assert index.nth_entry(6).etag == '"e0"'


def test_inodes_stable_across_rebuilds(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    fake_manifest(m, 3000, dirs=7, dup_every=5)
    trees = []
    for i in range(2):
        build_index(m, tmp_path / f"{i}.sqlite", manifest_digest="x")
        with Index.open(tmp_path / f"{i}.sqlite") as index:
            trees.append(walk(index))
    assert trees[0] == trees[1]
    assert len(trees[0]) == 3000 + 2401 + 3000 + 1  # by-path + distinct objects + by-id + manifest.jsonl
    assert min(v for k, v in trees[0].items() if k.startswith("images/")) == OBJ_BASE


def test_readdir_pages_resume_from_key(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    fake_manifest(m, 2000, dirs=1)
    build_index(m, tmp_path / "i.sqlite", manifest_digest="x")
    with Index.open(tmp_path / "i.sqlite") as index:
        class0 = index.lookup(BY_PATH_INODE, b"class0000")
        assert class0 is not None
        for parent in (BY_ID_INODE, class0):
            full = list(index.readdir(parent))
            assert len(full) == 2000
            keys = [k for _n, _i, k in full]
            assert keys == sorted(keys) and len(set(keys)) == len(keys)
            # resume from any key: exactly the rest
            for cut in (0, 1, 511, 512, 1500, 1999):
                rest = list(index.readdir(parent, keys[cut]))
                assert rest == full[cut + 1:]


@pytest.mark.parametrize(("lines", "message"), [
    ([entry(0), "{not json"], ":2: not valid JSON"),
    ([entry(0), entry(1, bytes=-1)], ":2: bytes"),
    ([entry(0), entry(0, bytes=5)], ":2: sha256 "),
    ([entry(0, source_path="a/b.png"), entry(1), entry(2, source_path="a/b.png")], ":3: source_path: 'a/b.png' "
                                                                                  "is already named on line 1"),
    ([entry(0, source_path="a/b"), entry(1, source_path="a/b/c.png")], "is also a directory"),
])
def test_bad_manifest_names_the_line_and_leaves_nothing(tmp_path: Path, lines: list[object], message: str) -> None:
    m = write(tmp_path / "m.jsonl", lines)  # type: ignore[arg-type]
    dest = tmp_path / "out" / "i.sqlite"
    with pytest.raises(ManifestError) as info:
        build_index(m, dest, manifest_digest="x", where="s3://b/k")
    assert str(info.value).startswith("s3://b/k:")
    assert message in str(info.value)
    assert os.listdir(dest.parent) == []


def test_open_checks_metadata(tmp_path: Path) -> None:
    m = write(tmp_path / "m.jsonl", [entry(0)])
    build_index(m, tmp_path / "i.sqlite", manifest_digest="a" * 64)
    with pytest.raises(ManifestError, match="expected"):
        Index.open(tmp_path / "i.sqlite", manifest_digest="b" * 64)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ManifestError):
        Index.open(tmp_path / "junk.sqlite")
    with pytest.raises(ManifestError):
        Index.open(tmp_path / "missing.sqlite")


def test_index_dirs_created_private_at_every_level(tmp_path: Path) -> None:
    """A mount loads its index before its cache exists: the cache directory it creates on the way
    (cache_dir/index) is 0700 at every level, whatever the umask."""
    m = tmp_path / "m.jsonl"
    fake_manifest(m, 10)
    old = os.umask(0o022)
    try:
        ensure_index(m, tmp_path / "cache" / "index").close()
    finally:
        os.umask(old)
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == oct(0o700)
    assert oct((tmp_path / "cache" / "index").stat().st_mode & 0o777) == oct(0o700)


def test_ensure_index_builds_once_and_reuses(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    fake_manifest(m, 500)
    results: list[Index] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_index(m, tmp_path / "index")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    built = list((tmp_path / "index").glob("*.sqlite"))
    assert len(built) == 1 and all(r.entry_count() == 500 for r in results)
    mtime = built[0].stat().st_mtime_ns
    again = ensure_index(m, tmp_path / "index")
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert (tmp_path / "index").stat().st_mode & 0o777 == 0o700
    for r in [*results, again]:
        r.close()


def test_index_is_usable_from_threads(small: Index) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                assert small.by_logical_id("B") is not None
                assert len(list(small.readdir(ROOT_INODE))) == 4
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.timeout(120)
def test_build_streams_a_large_manifest(tmp_path: Path) -> None:
    """100,000 entries: the build stays well under the 1M goal pro rata, and lookups stay indexed."""
    m = tmp_path / "m.jsonl"
    fake_manifest(m, 100_000, dup_every=10)
    started = time.monotonic()
    build_index(m, tmp_path / "i.sqlite", manifest_digest="x")
    elapsed = time.monotonic() - started
    assert elapsed < 15, elapsed
    with Index.open(tmp_path / "i.sqlite") as index:
        assert index.entry_count() == 100_000
        started = time.monotonic()
        for i in range(0, 100_000, 50):
            e = index.nth_entry(i)
            assert e.logical_id is not None
            assert index.lookup(BY_ID_INODE, e.logical_id.encode()) is not None
            assert index.by_sha256(e.sha256) is not None
        assert time.monotonic() - started < 5


def test_nlink_counts_distinct_logical_ids_of_repeated_objects(tmp_path: Path) -> None:
    m = write(tmp_path / "m.jsonl", [
        entry(0, logical_id="A", source_path="x/1.png"),
        entry(0, logical_id="A", source_path="x/2.png"),  # same id again: one by-id name
        entry(0, logical_id="B"),
        entry(1, logical_id="A"),
        entry(2, logical_id="C", source_path="y.png"),
        entry(3),
    ])
    build_index(m, tmp_path / "i.sqlite", manifest_digest="x")
    with Index.open(tmp_path / "i.sqlite") as index:
        files = walk(index)
        nlinks = {index.object_for_inode(i).sha256: attr_of(index, i).nlink for i in set(files.values())
                  if index.is_object(i)}
        assert nlinks == {sha(0): 1 + 2 + 2, sha(1): 2, sha(2): 3, sha(3): 1}
        for ino in set(files.values()):
            if index.is_object(ino):
                assert attr_of(index, ino).nlink == sum(1 for v in files.values() if v == ino)


def test_fast_and_slow_lines_build_the_same_index(tmp_path: Path) -> None:
    """Canonical lines take the fast parser, others (spaces, another field order) json.loads: same index."""
    rows: list[dict[str, Any]] = [entry(i, logical_id=f"L{i % 3}", source_path=f"d{i % 2}/f{i}.png", etag='"e"',
                                        width=2) for i in range(20)]
    fast = write(tmp_path / "fast.jsonl", [Entry(**{**r, "bytes": int(r["bytes"])}).to_json() for r in rows])
    slow = write(tmp_path / "slow.jsonl", [json.dumps(dict(reversed(list(r.items())))) for r in rows])
    trees = []
    for m in (fast, slow):
        build_index(m, tmp_path / f"{m.stem}.sqlite", manifest_digest="x")
        with Index.open(tmp_path / f"{m.stem}.sqlite") as index:
            trees.append((walk(index), list(index.iter_entries())))
    assert trees[0] == trees[1]


def _tree(index: Index) -> tuple[dict[str, int], list[Entry], dict[int, Attr | None], dict[str, str]]:
    files = walk(index)
    attrs = {i: index.getattr(i) for i in set(files.values())}
    return files, list(index.iter_entries()), attrs, index.metadata


def _mixed_rows(n: int) -> list[dict[str, object] | str]:
    """Entries with repeated objects, ids and by-path directories spread over the whole manifest."""
    rows: list[dict[str, object] | str] = []
    for i in range(n):
        if i % 7 == 3:
            rows.append("")
        src = f"top{i % 3}/mid{i % 5}/f{i}.png" if i % 4 else None
        rows.append(entry(i % 40, logical_id=f"L{i % 13}" if i % 3 else None, source_path=src, width=1 + i % 2))
    return rows


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_parts_build_the_same_index_as_one_process(tmp_path: Path, parts: int) -> None:
    """Helper processes parse later parts; merged, the index is the one a single process builds: the same
    inode numbers (by-path directories numbered in order of first appearance in the whole manifest)."""
    m = write(tmp_path / "m.jsonl", _mixed_rows(120))
    trees = []
    for p in (1, parts):
        build_index(m, tmp_path / f"{p}.sqlite", manifest_digest="x", mtime_ns=1, parts=p)
        with Index.open(tmp_path / f"{p}.sqlite") as index:
            trees.append(_tree(index))
    assert trees[0][0] == trees[1][0]
    assert trees[0][1:3] == trees[1][1:3]
    assert {k: v for k, v in trees[0][3].items() if k != "built_at"} == \
           {k: v for k, v in trees[1][3].items() if k != "built_at"}
    assert sorted(os.listdir(tmp_path)) == sorted(["m.jsonl", "1.sqlite", f"{parts}.sqlite"])  # no part left


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", "not valid JSON"),
    (entry(0, bytes=5), "sha256 "),
    (entry(99, source_path="top1/mid1/f1.png"), "source_path: 'top1/mid1/f1.png' is already named on line 2"),
    (entry(99, source_path="top1/mid1"), "is also a directory"),
])
def test_errors_in_a_later_part_name_the_manifest_line(tmp_path: Path, bad: object, message: str) -> None:
    rows = _mixed_rows(60)
    rows.insert(55, bad)  # type: ignore[arg-type]
    lineno = 56
    m = write(tmp_path / "m.jsonl", rows)
    assert m.read_text().splitlines()[lineno - 1] == (bad if isinstance(bad, str) else json.dumps(bad))
    dest = tmp_path / "out" / "i.sqlite"
    for parts in (1, 3):
        with pytest.raises(ManifestError) as info:
            build_index(m, dest, manifest_digest="x", where="s3://b/k", parts=parts)
        assert str(info.value).startswith(f"s3://b/k:{lineno}: "), (parts, str(info.value))
        assert message in str(info.value)
        assert os.listdir(dest.parent) == []


def test_ensure_index_builds_in_a_child_process_and_reports_bad_lines(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fsimg.index_build

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("built in the calling process")

    monkeypatch.setattr(s3fsimg.index_build, "build_index", not_here)  # the child process has the real one
    m = write(tmp_path / "m.jsonl", [entry(0), entry(1), entry(2, bytes=-1)])
    with pytest.raises(ManifestError, match=r"^s3://b/k:3: bytes"):
        ensure_index(m, tmp_path / "index", where="s3://b/k")
    assert [p.suffix for p in (tmp_path / "index").iterdir()] == [".lock"]
    m = write(tmp_path / "m.jsonl", [entry(0), entry(1)])
    with ensure_index(m, tmp_path / "index") as index:
        assert index.entry_count() == 2
