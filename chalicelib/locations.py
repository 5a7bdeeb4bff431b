"""Where a model archive is: an S3 object, or a file on local disk.

Plain values, so that settings can name them without importing what reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Archive:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class LocalArchive:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


ArchiveLocation = S3Archive | LocalArchive
