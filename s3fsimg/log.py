"""Logging set-up, with a filter that keeps secrets out of every record at every level.

botocore logs request headers at DEBUG (Authorization, X-Amz-Security-Token). The filter
replaces the values of AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_ACCESS_KEY_ID, and any
signature or token header, with `***` in the formatted message before any handler sees it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_PATTERNS = [
    re.compile(r"(Signature=)[0-9a-fA-F]+"),
    re.compile(r"(Signature:\s*)[0-9a-fA-F]{64}"),  # botocore.auth's debug line "Signature:\n<hex>"
    re.compile(r"(Credential=)[^,/\s'\"]+"),
    re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token)['\"]?\s*[:=]\s*b?['\"]?)[^'\"&\s,}]+"),
    re.compile(r"((?:X-Amz-Signature|X-Amz-Credential)=)[^&\s'\"]+"),
]


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with every known secret replaced by `***`."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = sorted({v for k in _SECRET_VARS if (v := os.environ.get(k)) and len(v) >= 4},
                              key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        for pattern in _PATTERNS:
            text = pattern.sub(r"\1***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string should not kill logging
            return True
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info:
            import traceback

            record.msg = record.msg + "\n" + self.redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: str = "warning", log_file: Path | None = None) -> None:
    """Configure the root logger once: stderr (or `log_file`), one line per record, secrets redacted."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        mask = os.umask(0o077)  # a log names buckets and keys: 0600, like everything in the cache directory
        try:
            handler = logging.FileHandler(log_file)
        finally:
            os.umask(mask)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    if level != "debug":
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
