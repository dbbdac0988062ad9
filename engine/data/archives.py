"""Sources given as an archive of a folder (.tar, .tar.gz, .tgz, .zip), local or remote (s3://…).

The shard writer reads folders; an archive is unpacked into a temporary folder for the time of the
writing and removed afterwards. An archive whose only top-level entry is a folder (``train.tar.gz``
holding ``train/<class>/…``) stands for that folder.
"""

from __future__ import annotations

import contextlib
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from engine import storage
from engine.errors import DataError
from engine.storage import StorageConfig

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def is_archive(src: str | None) -> bool:
    return src is not None and src.lower().endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def unpacked(src: str | None, storage_config: StorageConfig | None = None) -> Iterator[str | None]:
    """``src`` itself, or for an archive the folder it holds, unpacked until the block ends."""
    if not is_archive(src):
        yield src
        return
    assert src is not None
    with tempfile.TemporaryDirectory(prefix="distill-source-") as scratch:
        archive = Path(scratch) / ("archive" + _suffix(src))
        if storage.is_remote(src):
            fs, path = storage.filesystem(src, storage_config)
            if not fs.exists(path):
                raise DataError(f"{storage.redact(src)}: no such archive")
            fs.get(path, str(archive))
        elif Path(src).is_file():
            archive = Path(src)
        else:
            raise DataError(f"{src}: no such archive")
        root = Path(scratch) / "unpacked"
        _extract(archive, root, storage.redact(src))
        yield str(_content_root(root))


def _suffix(src: str) -> str:
    return next(s for s in ARCHIVE_SUFFIXES if src.lower().endswith(s))


def _extract(archive: Path, into: Path, name: str) -> None:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)  # zipfile drops absolute paths and '..' from member names
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")  # refuses links and paths that leave `into`
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(f"{name}: not a readable archive ({err})") from err
    if not into.exists() or not any(into.iterdir()):
        raise DataError(f"{name}: the archive is empty")


def _content_root(root: Path) -> Path:
    entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root
