"""s3fsimg: content-addressed image datasets in S3.

Layers, data flowing one way (each module's docstring says what it owns):

    config -> s3 -> manifest -> index -> cache -> reader -> dataset / fs -> mount -> cli

The uploader (scan, uploader) sits beside the read path and imports only config, s3 and manifest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Dataset"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from s3fsimg.dataset import Dataset


def __getattr__(name: str) -> Any:
    # Lazy, so `s3fsimg manifest` and the uploader do not import the read path.
    if name == "Dataset":
        from s3fsimg.dataset import Dataset

        return Dataset
    raise AttributeError(name)
