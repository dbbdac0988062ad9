"""Paths and URLs for every file the engine reads or writes: local paths, ``file://`` and ``s3://``.

All access goes through fsspec. Writes are atomic: data goes to a temporary file first and only a
complete file is renamed (local) or uploaded in one PUT (object stores), so no reader ever sees a
half-written file. S3 settings come from the config's ``storage`` section or the standard AWS
environment variables; credentials are never logged or written to a resolved config.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Annotated, Any

import fsspec
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from engine.errors import StorageError


class StorageConfig(BaseModel):
    """How to reach object stores. Unset fields fall back to the AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, R2...); default AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."
    )
    s3_region: str | None = Field(None, description="Region name; default AWS_REGION / AWS_DEFAULT_REGION.")
    s3_anonymous: bool = Field(False, description="Access public buckets without credentials.")
    s3_access_key_id: SecretStr | None = Field(None, description="Prefer the AWS_ACCESS_KEY_ID environment variable.")
    s3_secret_access_key: SecretStr | None = Field(None, description="Prefer AWS_SECRET_ACCESS_KEY.")

    def s3fs_kwargs(self) -> dict[str, Any]:
        endpoint = self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = self.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {"anon": self.s3_anonymous, "client_kwargs": {}}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if region:
            kwargs["client_kwargs"]["region_name"] = region
        if self.s3_access_key_id and self.s3_secret_access_key:
            kwargs["key"] = self.s3_access_key_id.get_secret_value()
            kwargs["secret"] = self.s3_secret_access_key.get_secret_value()
        return kwargs


DEFAULT_STORAGE = StorageConfig()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers run in their own working directories); URLs unchanged."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


# A config field holding a local path or URL; relative local paths are resolved where the config is loaded.
PathOrURL = Annotated[str, AfterValidator(absolute)]


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    storage = storage or DEFAULT_STORAGE
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = storage.s3fs_kwargs() if protocol in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{redact(url)}: unsupported storage URL ({err})") from err
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def redact(text: str) -> str:
    """Strip credentials embedded in a URL (``s3://key:secret@bucket``) before it is printed."""
    if "://" in text and "@" in text.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return text


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """Turn the many ways a backend says 'not there' into one clear StorageError naming the URL."""
    try:
        yield
    except FileNotFoundError as err:
        raise StorageError(f"{redact(url)}: no such file, directory or bucket") from err
    except PermissionError as err:
        raise StorageError(f"{redact(url)}: permission denied ({err})") from err
    except OSError as err:
        if "NoSuchBucket" in str(err) or "does not exist" in str(err):
            raise StorageError(f"{redact(url)}: bucket does not exist") from err
        raise


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Object-store filesystems cache listings; forget them so files written by other processes are seen."""
    if not _is_local(fs):
        fs.invalidate_cache(path)


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(url, storage)
    _fresh(fs, path)
    with _storage_errors(url):
        return fs.exists(path)


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    with _storage_errors(url):
        return fs.cat_file(path)


def read_json(url: str, storage: StorageConfig | None = None) -> Any:
    raw = read_bytes(url, storage)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise StorageError(f"{redact(url)}: not valid JSON ({err})") from err


def list_files(url: str, storage: StorageConfig | None = None, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under ``url`` whose names end in ``suffix``, sorted.

    Hidden files (temporary files of writes in progress start with '.') are never listed.
    """
    fs, path = filesystem(url, storage)
    _fresh(fs, path)
    with _storage_errors(url):
        if not fs.isdir(path):
            raise StorageError(f"{redact(url)}: not a directory")
        names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    return sorted(join(url, n) for n in names if n.endswith(suffix) and not n.startswith("."))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@contextlib.contextmanager
def atomic_open(url: str, storage: StorageConfig | None = None) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears complete at ``url`` or not at all.

    Local: a hidden temporary file in the target directory, fsynced, then ``os.replace``.
    Object stores: a local temporary file uploaded in one ``put`` once it is complete.
    """
    fs, path = filesystem(url, storage)
    if _is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        tmp_path = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    else:
        handle, tmp_path = tempfile.mkstemp(prefix="distill-upload-")
        os.close(handle)
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if _is_local(fs):
            os.replace(tmp_path, path)
        else:
            with _storage_errors(url):
                fs.put_file(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    with atomic_open(url, storage) as f:
        f.write(data)


def write_json(url: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), storage)


def write_text(url: str, text: str, storage: StorageConfig | None = None) -> None:
    write_bytes(url, text.encode(), storage)


def remove(url: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, storage)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
