"""The `s3fsimg` command (click). The one place where errors become a line on stderr and an exit code.

Options are declared once (`S3_OPTIONS`, `CACHE_OPTIONS`...) and attached to the commands that use
them. Each command builds a `Config` (.env < environment < flags) before any network call; a
`ConfigError` exits 2, any other `S3fsimgError` exits 1 with its one-line message. Tracebacks are
shown only for bugs, or with `--log-level debug`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from s3fsimg.config import ADDRESSING_STYLES, LOG_LEVELS, Config
from s3fsimg.errors import BackendError, S3fsimgError, UsageError
from s3fsimg.log import setup_logging
from s3fsimg.units import format_size

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("s3fsimg")


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


LOG_OPTIONS = _options(
    click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                 help="debug, info, warning (default), error  [DATASET_LOG_LEVEL]"),
)
S3_OPTIONS = _options(
    click.option("--bucket", default=None, help="bucket name  [S3_BUCKET]"),
    click.option("--endpoint-url", default=None, help="S3-compatible endpoint  [S3_ENDPOINT_URL]"),
    click.option("--addressing-style", type=click.Choice(ADDRESSING_STYLES), default=None,
                 help="auto, path or virtual  [S3_ADDRESSING_STYLE]"),
    click.option("--anonymous/--no-anonymous", default=None,
                 help="unsigned requests (public buckets)  [S3_ANONYMOUS]"),
    click.option("--prefix", default=None, help="key prefix inside the bucket  [DATASET_PREFIX]"),
    click.option("--manifest-key", default=None, help="manifest key under the prefix  [DATASET_MANIFEST_KEY]"),
    LOG_OPTIONS,
)
CACHE_DIR_OPTION = click.option("--cache-dir", default=None, help="local cache directory  [DATASET_CACHE_DIR]")
CACHE_OPTIONS = _options(
    CACHE_DIR_OPTION,
    click.option("--cache-max-bytes", default=None, help="cache bound, e.g. 500M, 10G  [DATASET_CACHE_MAX_BYTES]"),
    click.option("--read-deadline", default=None, help="how long a read may retry S3 (30s)  [DATASET_READ_DEADLINE]"),
)
MAP_OPTIONS = _options(
    click.option("--logical-map", default=None, help="CSV of filename,logical_id  [DATASET_LOGICAL_MAP]"),
)


def _config(flags: dict[str, Any]) -> Config:
    config = Config.load({k: v for k, v in flags.items() if k in Config.__dataclass_fields__})
    setup_logging(config.log_level, flags.get("log_file"))
    return config


def _run(fn: F) -> F:
    """Run a command body; map our errors to one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except S3fsimgError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            # Exit now: transfers still running in worker threads would otherwise be waited for (a
            # large object over a slow link: a minute). Leaving them is what a kill does, and every
            # write is crash-safe: cache files are renamed into place when complete (a dead
            # process's temp files are removed by the next user), the manifest goes up last.
            click.echo("s3fsimg: interrupted", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except BrokenPipeError:
            sys.exit(1)
        except OSError as exc:  # a path the user named (--out, --log-file...): what and where, one line
            _fail(f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc), 1)

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr and the exit code; the traceback only in a debug log."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        log.debug("error detail", exc_info=True)
    click.echo(f"s3fsimg: error: {message}", err=True)
    sys.exit(code)


class _Program(click.Group):
    """The command group; also takes the FUSE mount helper's form `s3fsimg BUCKET MOUNTPOINT -o opts`
    (what `mount -t fuse.s3fsimg` and /etc/fstab run, through mount.fuse3) as a `mount` (see fstab.py)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from s3fsimg.fstab import apply, is_helper_call, translate

        if is_helper_call(args, self.commands):
            try:
                args = apply(translate(args))
            except S3fsimgError as exc:
                _fail(str(exc), exc.exit_code)
        return super().parse_args(ctx, args)


@click.group(cls=_Program, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="s3fsimg")
def main() -> None:
    """Content-addressed image datasets in S3: upload, validate, fetch through a cache, mount read-only.

    \b
    Also the FUSE mount helper (/etc/fstab, mount -t fuse.s3fsimg):
      s3fsimg BUCKET MOUNTPOINT -o ro,allow_other,cache_dir=/var/cache/s3fsimg,env_file=/etc/s3fsimg/ds.env
    """


# -- write side -----------------------------------------------------------------------------------


@main.command("manifest")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="where to write (default: the manifest key, manifests/inventory-v1.jsonl)")
@MAP_OPTIONS
@LOG_OPTIONS
@_run
def manifest_cmd(directory: Path, out: Path | None, **flags: Any) -> None:
    """Hash every image under DIRECTORY and write the JSONL manifest (no S3 access)."""
    from s3fsimg.manifest import write_manifest_file
    from s3fsimg.progress import progress_bar
    from s3fsimg.scan import prepare, scan, shown

    config = _config(flags)
    out = out or Path(config.manifest_key)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory (--out names the manifest file to write)")
    lmap, total = prepare(directory, config.logical_map)
    skipped: list[tuple[str, str]] = []
    with progress_bar(total=total, unit="file", desc="hash") as bar:

        def entries():  # type: ignore[no-untyped-def]
            for result in scan(directory, logical_map=lmap):
                bar.update(1)
                if result.entry is None:
                    skipped.append((result.rel, result.skipped or ""))
                else:
                    yield result.entry

        # an empty manifest is invalid (validate refuses it) and must not replace a good one
        n = write_manifest_file(entries(), out, write_empty=False)
    for rel, reason in skipped:
        click.echo(f"skipped {rel}: {reason}", err=True)
    if note := lmap.unmatched_note():
        click.echo(note, err=True)
    if n == 0:
        raise UsageError(f"{shown(os.fspath(directory))}: no images found ({len(skipped)} files skipped); "
                         "no manifest written")
    click.echo(f"wrote {out}: {n} entries, {len(skipped)} files skipped")


@main.command("upload")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--workers", type=click.IntRange(1, 256), default=16, show_default=True, help="parallel uploads")
@MAP_OPTIONS
@S3_OPTIONS
@CACHE_DIR_OPTION
@_run
def upload_cmd(directory: Path, workers: int, **flags: Any) -> None:
    """Upload every image under DIRECTORY not yet in the bucket, then the manifest, last."""
    from s3fsimg.uploader import upload

    config = _config(flags)
    report = upload(config, directory, workers=workers)
    for rel, reason in report.skipped:
        click.echo(f"skipped {rel}: {reason}", err=True)
    if report.map_note:
        click.echo(report.map_note, err=True)
    click.echo(
        f"uploaded {report.uploaded} objects ({format_size(report.uploaded_bytes)}), "
        f"skipped {report.present} already in the bucket and {report.duplicates} duplicates, "
        f"{len(report.skipped)} files skipped; block maps {report.maps_uploaded} added, "
        f"{report.maps_present} already there; manifest {'uploaded' if report.manifest_uploaded else 'unchanged'} "
        f"with {report.entries} entries in {report.seconds:.1f}s -> {config.where(config.manifest_key)}"
    )


@main.command("validate")
@click.argument("manifest", required=False, type=click.Path(path_type=Path))
@click.option("--check-objects", is_flag=True, help="also HEAD every object and compare its size")
@click.option("--max-errors", type=click.IntRange(min=0), default=0, help="stop after this many errors (0: report all)")
@S3_OPTIONS
@_run
def validate_cmd(manifest: Path | None, check_objects: bool, max_errors: int, **flags: Any) -> None:
    """Validate MANIFEST (a local file), or the bucket's manifest when none is named."""
    from s3fsimg.validate import validate

    config = _config(flags)
    errors, entries = validate(config, manifest, check_objects=check_objects, max_errors=max_errors,
                               echo=lambda line: click.echo(line, err=True))
    if errors:
        click.echo(f"invalid: {errors} error(s) in {entries} entries", err=True)
        sys.exit(1)
    click.echo(f"valid: {entries} entries")


# -- read side ------------------------------------------------------------------------------------


@main.command("fetch")
@click.argument("ids", nargs=-1, required=True)
@S3_OPTIONS
@CACHE_OPTIONS
@_run
def fetch_cmd(ids: tuple[str, ...], **flags: Any) -> None:
    """Print the local path of each image named by sha256 or logical_id (read-through cache)."""
    from s3fsimg.dataset import Dataset

    with Dataset(_config(flags)) as ds:
        for path in ds.fetch_many(ids, progress=len(ids) > 1):
            click.echo(str(path))


@main.command("random-fetch")
@click.option("--n", "count", type=click.IntRange(1), default=5, show_default=True)
@click.option("--seed", type=int, default=None)
@S3_OPTIONS
@CACHE_OPTIONS
@_run
def random_fetch_cmd(count: int, seed: int | None, **flags: Any) -> None:
    """Fetch N random manifest entries through the cache; print their local paths."""
    from s3fsimg.dataset import Dataset

    with Dataset(_config(flags)) as ds:
        shas = [e.sha256 for e in ds.sample(count, seed=seed)]
        for path in ds.fetch_many(shas, progress=count > 1):
            click.echo(str(path))


@main.command("warm")
@click.argument("targets", nargs=-1, metavar="[ID|PATH]...")
@click.option("--from", "from_files", multiple=True, metavar="FILE",
              help="ids (or mount paths), one a line; '-' reads standard input")
@click.option("--all", "warm_all", is_flag=True, help="every object of the manifest")
@click.option("--threads", type=click.IntRange(1, 256), default=32, show_default=True, help="fetches in flight")
@S3_OPTIONS
@CACHE_OPTIONS
@_run
def warm_cmd(targets: tuple[str, ...], from_files: tuple[str, ...], warm_all: bool, threads: int,
             **flags: Any) -> None:
    """Fill the cache for images named by id, by a file or directory of a mount, by --from FILE, or --all.

    Stops at the cache bound (and says so): warming more would evict what it warmed.
    """
    from itertools import chain

    from s3fsimg.dataset import Dataset
    from s3fsimg.warm import entries_for, read_id_file, warm_entries

    if not (targets or from_files or warm_all):
        raise click.UsageError("nothing to warm: name ids or paths, --from FILE, or --all")
    config = _config(flags)
    with Dataset(config) as ds:
        if warm_all:
            entries = list(ds.entries())
        else:
            names = chain(targets, *(read_id_file(f) for f in from_files))
            entries = list(entries_for(ds, names))
        report = warm_entries(ds.reader, entries, bound=config.cache_max_bytes, threads=threads)
    if note := report.note():
        click.echo(note, err=True)
    click.echo(report.summary(str(config.cache_dir)))
    if report.failed:
        raise BackendError(f"{report.failed} of {report.planned} images could not be warmed; the first: "
                           f"{report.first_error}")


@main.group("cache")
def cache_group() -> None:
    """Inspect or empty the local cache directory."""


@cache_group.command("stats")
@click.option("--json", "as_json", is_flag=True)
@CACHE_OPTIONS
@LOG_OPTIONS
@_run
def cache_stats_cmd(as_json: bool, **flags: Any) -> None:
    """Size and counts of the cache directory."""
    from s3fsimg.cache import DiskCache

    config = _config(flags)
    with DiskCache(config.cache_dir, config.cache_max_bytes) as cache:
        stats = cache.stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    click.echo(f"cache {config.cache_dir}: {format_size(stats['bytes'])} of {format_size(stats['max_bytes'])} "
               f"in {stats['objects']} complete objects and {stats['blocks']} blocks")


@cache_group.command("clear")
@CACHE_OPTIONS
@LOG_OPTIONS
@_run
def cache_clear_cmd(**flags: Any) -> None:
    """Empty the cache safely (processes using it keep working)."""
    from s3fsimg.cache import DiskCache

    config = _config(flags)
    with DiskCache(config.cache_dir, config.cache_max_bytes) as cache:
        freed = cache.clear()
    click.echo(f"cleared {config.cache_dir}: freed {format_size(freed)}")


@cache_group.command("verify")
@CACHE_OPTIONS
@LOG_OPTIONS
@_run
def cache_verify_cmd(**flags: Any) -> None:
    """Re-hash every complete object and block in the cache, remove what is bad; exit 1 when it found damage."""
    from s3fsimg.cache import DiskCache
    from s3fsimg.progress import progress_bar

    config = _config(flags)
    with (
        DiskCache(config.cache_dir, config.cache_max_bytes) as cache,
        progress_bar(total=cache.stats()["bytes"], unit="B", desc="verify", unit_scale=True) as bar,
    ):
        report = cache.verify(on_bytes=bar.update)
    click.echo(report.summary(str(config.cache_dir)))
    if report.removed:
        sys.exit(1)


# -- filesystem -----------------------------------------------------------------------------------


@main.command("mount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="stay attached (default: return once mounted)")
@click.option("--allow-other", is_flag=True, help="let other users in (see README: security)")
@click.option("--allow-non-empty", is_flag=True, help="mount over a directory that has files in it (hides them)")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="processes serving the mount (default: one per core, at most 8)  [DATASET_MOUNT_WORKERS]")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="log here (default: stderr with --foreground, else CACHE_DIR/mount.log)")
@S3_OPTIONS
@CACHE_OPTIONS
@_run
def mount_cmd(mountpoint: Path, foreground: bool, allow_other: bool, allow_non_empty: bool, log_file: Path | None,
              **flags: Any) -> None:
    """Mount the dataset read-only at MOUNTPOINT."""
    from s3fsimg.mount import mount

    config = _config({**flags, "log_file": log_file})
    status = mount(config, mountpoint, foreground=foreground, allow_other=allow_other, log_file=log_file,
                   allow_non_empty=allow_non_empty)
    if status:
        sys.exit(status)  # the mount ended because a worker died (its log says which)


@main.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@LOG_OPTIONS
@_run
def umount_cmd(mountpoint: Path, **flags: Any) -> None:
    """Unmount a mount of this program."""
    from s3fsimg.mount import umount

    _config(flags)
    umount(mountpoint)


@main.command("stats")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
@LOG_OPTIONS
@_run
def stats_cmd(mountpoint: Path, as_json: bool, **flags: Any) -> None:
    """Live counters of a running mount."""
    from s3fsimg.mount import read_stats

    _config(flags)
    stats = read_stats(mountpoint)
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in stats) if stats else 0
    for key in sorted(stats):
        click.echo(f"{key:<{width}}  {stats[key]}")


__all__ = ["main"]

if __name__ == "__main__":
    main()
