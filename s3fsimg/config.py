"""Configuration: one `Config` built from, in increasing priority, `./.env`, the environment, CLI flags.

Every variable of the contract is read here and nowhere else. Validation (sizes, durations,
choices) happens at load time, so a bad value exits 2 before any network call.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from s3fsimg.errors import ConfigError, quoted
from s3fsimg.units import parse_duration, parse_size

ADDRESSING_STYLES = ("auto", "path", "virtual")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MANIFEST_KEY = "manifests/inventory-v1.jsonl"

#: variable -> Config field. Flags use the field name; the defaults are the field defaults of `Config`.
VARIABLES: dict[str, str] = {
    "S3_BUCKET": "bucket",
    "S3_ENDPOINT_URL": "endpoint_url",
    "S3_ADDRESSING_STYLE": "addressing_style",
    "S3_ANONYMOUS": "anonymous",
    "DATASET_PREFIX": "prefix",
    "DATASET_MANIFEST_KEY": "manifest_key",
    "DATASET_CACHE_DIR": "cache_dir",
    "DATASET_CACHE_MAX_BYTES": "cache_max_bytes",
    "DATASET_LOGICAL_MAP": "logical_map",
    "DATASET_READ_DEADLINE": "read_deadline",
    "DATASET_LOG_LEVEL": "log_level",
    # Tuning knobs beyond the contract (defaults chosen by bench/bench_cache.py).
    "DATASET_BLOCK_SIZE": "block_size",
    "DATASET_WHOLE_OBJECT_MAX": "whole_object_max",
    "DATASET_MOUNT_WORKERS": "workers",
}

#: What botocore accepts as a bucket name (S3-compatible stores differ on the finer rules; an ARN too)
_BUCKET_RE = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Config:
    """The configuration. Its field defaults are the defaults of every variable and flag (the
    contract's: 10G is 10 << 30, 30s is 30.0)."""

    bucket: str | None = None
    endpoint_url: str | None = None
    addressing_style: str = "auto"
    anonymous: bool = False
    prefix: str = ""
    manifest_key: str = DEFAULT_MANIFEST_KEY
    cache_dir: Path = Path("/tmp/imgcache")
    cache_max_bytes: int = 10 << 30
    logical_map: Path | None = None
    read_deadline: float = 30.0
    log_level: str = "warning"
    block_size: int = 256 << 10
    whole_object_max: int = 1 << 20
    workers: int | None = None  # processes serving a mount; None: one per core, at most 8 (see workers.py)

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
             dotenv: Path | None = None) -> Config:
        """Build the configuration: `.env` (in the working directory) < environment < `flags`.

        `flags` maps Config field names to values; None means "not given".
        """
        if env is None:
            env_path = dotenv if dotenv is not None else Path.cwd() / ".env"
            if env_path.is_file():
                # Does not override the environment; also feeds boto3 (AWS_* in .env).
                for var, text in read_env_file(env_path, str(env_path)).items():
                    os.environ.setdefault(var, text)
            env = os.environ
        # An empty value (`VAR=` in .env, `--flag ''`) means "not set": the default applies (the field's,
        # parsed again like a given value, which it passes).
        defaults = {f.name: f.default for f in fields(cls)}
        raw: dict[str, Any] = {}
        for var, name in VARIABLES.items():
            value = env.get(var)
            raw[name] = (value, var) if value is not None and value.strip() else (defaults[name], var)
        for name, value in (flags or {}).items():
            if value is not None and not (isinstance(value, str) and not value.strip()):
                raw[name] = (value, "--" + name.replace("_", "-"))
        return cls._parse(raw)

    @classmethod
    def _parse(cls, raw: Mapping[str, tuple[Any, str]]) -> Config:
        def get(name: str) -> Any:
            return raw[name][0]

        def src(name: str) -> str:
            return raw[name][1]

        style = str(get("addressing_style")).lower()
        if style not in ADDRESSING_STYLES:
            raise ConfigError(f"{src('addressing_style')}: {style!r} is not one of {', '.join(ADDRESSING_STYLES)}")
        level = str(get("log_level")).lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"{src('log_level')}: {level!r} is not one of {', '.join(LOG_LEVELS)}")
        anonymous = get("anonymous")
        if not isinstance(anonymous, bool):
            text = str(anonymous).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ConfigError(f"{src('anonymous')}: {anonymous!r} is not a boolean (use 1 or 0)")
            anonymous = text in _TRUE
        prefix = str(get("prefix") or "").strip("/")
        manifest_key = str(get("manifest_key") or DEFAULT_MANIFEST_KEY).lstrip("/")
        bucket = get("bucket") or None
        if bucket is not None and not (_BUCKET_RE.match(bucket) or bucket.startswith("arn:")):
            raise ConfigError(f"{src('bucket')}: {quoted(bucket)} is not a bucket name (letters, digits, "
                              "'.', '-' and '_', at most 255)")
        endpoint = get("endpoint_url") or None
        if endpoint is not None:
            _check_endpoint(str(endpoint), src("endpoint_url"))
        block_size = parse_size(get("block_size"), src("block_size"))
        if block_size < 4096 or block_size & (block_size - 1):
            raise ConfigError(f"{src('block_size')}: must be a power of two of at least 4K")
        logical_map = get("logical_map")
        workers = get("workers")
        if workers is not None:
            if not str(workers).strip().isdigit() or int(workers) < 1:
                raise ConfigError(f"{src('workers')}: {quoted(str(workers))} is not a number of processes (1 or more)")
            workers = int(workers)
        return cls(
            bucket=bucket,
            endpoint_url=endpoint,
            addressing_style=style,
            anonymous=anonymous,
            prefix=prefix,
            manifest_key=manifest_key,
            cache_dir=Path(get("cache_dir")).expanduser(),
            cache_max_bytes=parse_size(get("cache_max_bytes"), src("cache_max_bytes")),
            logical_map=Path(logical_map).expanduser() if logical_map else None,
            read_deadline=parse_duration(get("read_deadline"), src("read_deadline")),
            log_level=level,
            block_size=block_size,
            whole_object_max=parse_size(get("whole_object_max"), src("whole_object_max")),
            workers=workers,
        )

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def require_bucket(self) -> str:
        if not self.bucket:
            raise ConfigError("no bucket: set S3_BUCKET (in the environment or .env) or pass --bucket")
        return self.bucket

    def key(self, relative: str) -> str:
        """The S3 key of `relative` (a manifest path or the manifest key) under the prefix."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def where(self, relative: str = "") -> str:
        """`s3://bucket/key` for messages (never contains credentials)."""
        return f"s3://{self.bucket or '?'}/{self.key(relative) if relative else self.prefix}"


def read_env_file(path: Path, where: str) -> dict[str, str]:
    """The KEY=VALUE lines of an env file (the `.env` syntax: comments, `export`, quotes); a ConfigError
    naming `where` when it cannot be read."""
    try:
        values = dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read it ({reason})") from None
    return {k: v for k, v in values.items() if v is not None}


def private_dirs(path: Path) -> Path:
    """`mkdir -p` with mode 0700 for every directory it creates (Path.mkdir gives parents the umask's
    mode): the rule of the cache directory and everything in it, whichever layer creates it first."""
    if not path.is_dir():
        private_dirs(path.parent)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    return path


def _check_endpoint(url: str, where: str) -> None:
    """An http(s) URL with a host and a valid port, and no user name or password (S3 signs requests
    with AWS credentials; a password in the URL would end up in messages). The URL is not echoed
    when it has credentials in it."""
    if "@" in url:  # before any parsing: a malformed URL with a password in it must not be echoed
        raise ConfigError(f"{where}: must not contain a user name or password (S3 credentials come from "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError:  # its text may quote the port part, which is not echoed either
        raise ConfigError(f"{where}: not a valid URL (a bad port or host)") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: {quoted(url)} is not an http:// or https:// URL")
    if not parts.hostname or any(c.isspace() for c in url) or (port is not None and port == 0):
        raise ConfigError(f"{where}: {quoted(url)} is not a valid URL (no host, a space, or port 0)")
