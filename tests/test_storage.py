from __future__ import annotations

import os

import pytest

from engine import storage
from engine.errors import StorageError


def test_atomic_write_local_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "sub" / "a.json")
    storage.write_json(url, {"x": 1})
    assert storage.read_json(url) == {"x": 1}
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_failed_write_keeps_old_content_and_no_partial_file(tmp_path):
    url = str(tmp_path / "a.bin")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError), storage.atomic_open(url) as f:
        f.write(b"half-written")
        raise RuntimeError("killed mid-write")
    assert storage.read_bytes(url) == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_list_files_hides_temporary_files(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / ".a.tar.tmp-123").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert storage.list_files(str(tmp_path), suffix=".tar") == [str(tmp_path / "a.tar")]


def test_file_url_and_missing_path(tmp_path):
    url = f"file://{tmp_path}/b.txt"
    storage.write_text(url, "hi")
    assert storage.read_bytes(url) == b"hi"
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.txt"))


def test_s3_round_trip_and_atomicity(s3_bucket):
    bucket, config = s3_bucket
    url = storage.join(bucket, "run", "results.json")
    storage.write_json(url, {"ok": True}, config)
    assert storage.read_json(url, config) == {"ok": True}
    with pytest.raises(RuntimeError), storage.atomic_open(storage.join(bucket, "run", "x.bin"), config) as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert not storage.exists(storage.join(bucket, "run", "x.bin"), config)
    assert storage.list_files(storage.join(bucket, "run"), config) == [url]


def test_s3_missing_bucket_is_one_line(s3_server):
    config = storage.StorageConfig(s3_endpoint_url=s3_server)
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://no-such-bucket-here/x.json", config)
    assert "no-such-bucket-here" in str(err.value)
    assert "\n" not in str(err.value)


def test_redact_credentials_in_urls():
    assert storage.redact("s3://AKIA:secret@bucket/x") == "s3://***@bucket/x"
    assert storage.redact("s3://bucket/x") == "s3://bucket/x"


def test_s3_write_to_missing_bucket_is_one_line(s3_server):
    config = storage.StorageConfig(s3_endpoint_url=s3_server)
    with pytest.raises(StorageError) as err:
        storage.write_json("s3://no-such-bucket-here/run/x.json", {}, config)
    assert "no-such-bucket-here" in str(err.value)
