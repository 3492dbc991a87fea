"""The project's one exception hierarchy.

Lower layers raise these; exactly two boundaries translate them:
- the FUSE boundary (`fs.errno_for`) maps each to an errno;
- the CLI boundary (`cli.main`) prints `str(error)` as one line and exits with `exit_code`.

Messages say what is wrong and where, and never contain a secret; a value from the user appears
through `quoted` (cut short, so a message stays one line).
"""

from __future__ import annotations

import errno


class S3fsimgError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1
    errno = errno.EIO


class ConfigError(S3fsimgError):
    """Bad configuration (missing bucket, malformed size...): detected before any network call."""

    exit_code = 2
    errno = errno.EINVAL


class UsageError(S3fsimgError):
    """A user's input is wrong: a missing directory, a bad logical map, an unknown id."""


class ManifestError(S3fsimgError):
    """A manifest cannot be read or is invalid."""


class NotFound(S3fsimgError):
    """A name, sha256 or logical id that the dataset does not have."""

    errno = errno.ENOENT


class BackendError(S3fsimgError):
    """S3 failed: unreachable, refused, 5xx after retries, deadline passed, access denied."""


class IntegrityError(S3fsimgError):
    """Bytes from S3 do not match the manifest (sha256, size or ETag)."""


class CacheError(S3fsimgError):
    """The local cache cannot be used (not writable, full, corrupt ledger)."""


class MountError(S3fsimgError):
    """The filesystem cannot be mounted (mountpoint, /dev/fuse, already mounted)."""


def quoted(value: object) -> str:
    """`repr(value)` for a one-line message, cut short: a message stays one readable line whatever a
    user's input held (a 10 MB logical_id, a URL)."""
    text = repr(value)
    if len(text) <= 100:
        return text
    return f"{text[:80]}... ({len(value)} characters)" if isinstance(value, str) else f"{text[:80]}..."
