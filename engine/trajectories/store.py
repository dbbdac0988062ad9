"""The sharded trajectory store: expert parameters per epoch, under a folder URL (local or s3://).

Layout (see docs/trajectories.md for the full protocol)::

    manifest.json                              written once: spec, params, fingerprint, hparams
    experts/expert-00000.safetensors           one shard per finished expert, epochs 0..E
    experts/expert-00000.json                  status sidecar, written after the shard
    partial/expert-00000/epoch-0003.safetensors   one file per finished epoch of a running expert
    partial/expert-00000/state.safetensors     TrainState after the newest epoch file
    partial/expert-00000/lease.json            {owner, heartbeat}: who is training this expert

A shard holds one tensor per (epoch, parameter) named ``epoch-0003/<parameter name>``; safetensors
sorts tensors by dtype then name, so each epoch's tensors are one contiguous byte range and
``load_epochs`` fetches an epoch with one ranged read. Metadata is a single JSON entry
(``trajectory``) so that the bytes are deterministic. Readers only see experts with a sidecar; the
sidecar's sha256 is checked by ``verify``, ``load_expert`` and ``iter_experts`` (which read the
whole shard) and its byte size by ``load_epochs`` (which does not).

This module reads a store and checks it fits a model; ``engine.trajectories.writer`` writes one and
``engine.trajectories.lease`` decides who trains which expert.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from torch import Tensor

from engine import storage
from engine.checkpoint import decode_tensor
from engine.errors import DataError, EngineError, StorageError
from engine.storage import StorageConfig

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METADATA_KEY = "trajectory"


class StoreMismatch(EngineError):
    """An existing store was recorded for another model, parameter set, data set or recipe."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamInfo(_Model):
    name: str
    shape: list[int]
    dtype: str = Field(description="torch dtype without the 'torch.' prefix, e.g. float32.")


class StoreManifest(_Model):
    format_version: int = FORMAT_VERSION
    spec: dict[str, Any] = Field(description="The model spec as a JSON dict (from the caller).")
    params: list[ParamInfo] = Field(description="Recorded parameters, in recording order.")
    fingerprint: str = Field(description="Fingerprint of the training data (from the caller).")
    hparams: dict[str, Any] = Field(description="Expert training hyper-parameters; must include 'epochs'.")

    @property
    def epochs(self) -> int:
        return int(self.hparams["epochs"])


class ExpertStatus(_Model):
    format_version: int = FORMAT_VERSION
    expert: int
    status: Literal["complete"] = "complete"
    shard: str
    epochs: int
    seed: int
    sha256: str
    bytes: int
    metrics: list[dict[str, float]] = Field(description="Metrics of epochs 0..E.")
    summary: dict[str, Any] = Field(default_factory=dict, description="Extra metrics given to finish().")

def param_infos(params: Mapping[str, Tensor]) -> list[ParamInfo]:
    """Name, shape and dtype of each recorded parameter (tensors or parameters)."""
    return [
        ParamInfo(name=n, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
        for n, t in params.items()
    ]


def snapshot_key(name: str, epoch: int) -> str:
    return f"epoch-{epoch:04d}/{name}"


def split_snapshot_key(key: str) -> tuple[int, str]:
    prefix, name = key.split("/", 1)
    return int(prefix.removeprefix("epoch-")), name


def expert_name(expert_id: int) -> str:
    return f"expert-{expert_id:05d}"

def _json_roundtrip(obj: Any) -> Any:
    """Plain JSON values (tuples become lists); a pydantic model (e.g. a ModelSpec) is dumped first."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.loads(json.dumps(obj))


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_NAME_KEYS = ("name", "arch", "architecture", "model", "kind", "type")


def spec_arguments(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, flattened arguments without None values) of a JSON spec.

    For an ``engine.models.ModelSpec`` dump the name is ``arch`` and the arguments are ``kwargs.*``.
    """
    flat = {k: v for k, v in _flatten(spec).items() if v is not None}
    name_key = next((k for k in _NAME_KEYS if k in flat), None)
    return (str(flat.pop(name_key)) if name_key else "model"), flat


def describe_spec(spec: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """``convnet(depth=3, width=128)``: the spec's name and its (selected) arguments."""
    name, args = spec_arguments(spec)
    shown = [k for k in (keys or args) if k in args]
    listed = ", ".join(f"{k.removeprefix('kwargs.')}={args[k]!r}" for k in shown)
    return f"{name}({listed})".replace("'", "")


def spec_difference(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    a, b = _flatten(stored), _flatten(given)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


def params_difference(stored: list[ParamInfo], given: list[ParamInfo]) -> list[str]:
    ours, theirs = {p.name: p for p in stored}, {p.name: p for p in given}
    out = [f"{n} is not in the store" for n in theirs if n not in ours]
    out += [f"{n} is missing" for n in ours if n not in theirs]
    for name in ours.keys() & theirs.keys():
        s, g = ours[name], theirs[name]
        if (s.shape, s.dtype) != (g.shape, g.dtype):
            out.append(f"{name} is {g.dtype}{g.shape}, the store has {s.dtype}{s.shape}")
    if not out and [p.name for p in stored] != [p.name for p in given]:
        out.append("the parameter order differs")
    return sorted(out)

def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted byte ranges with touching or overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged

class TrajectoryStore:
    """Read the expert trajectories under ``url`` (``StoreWriter`` adds writing)."""

    def __init__(self, url: str, manifest: StoreManifest, storage_config: StorageConfig | None = None) -> None:
        self.url = url.rstrip("/")
        self.manifest = manifest
        self.storage_config = storage_config
        self._fs = storage.filesystem(self.url, storage_config)[0]
        self._status: dict[int, ExpertStatus] = {}
        self._headers: dict[int, tuple[int, dict[str, Any]]] = {}

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, storage_config: StorageConfig | None = None) -> TrajectoryStore:
        """Open an existing store read-only (for distillation)."""
        return cls(url, read_manifest(url, storage_config), storage_config)

    def check_manifest(self, wanted: StoreManifest) -> None:
        self.check_compatible(wanted.spec, {p.name: p for p in wanted.params}, fingerprint=wanted.fingerprint)
        self._check_hparams(wanted.hparams)

    def check_compatible(
        self,
        spec: dict[str, Any] | BaseModel,
        param_shapes: Mapping[str, Any],
        fingerprint: str | None = None,
    ) -> None:
        """Raise StoreMismatch unless this store was recorded for ``spec`` and these parameters.

        ``param_shapes`` maps names to tensors, ParamInfo or shapes; dtypes are compared when known.
        """
        spec = _json_roundtrip(spec)
        if self.manifest.format_version != FORMAT_VERSION:
            self._mismatch(
                f"has format version {self.manifest.format_version}; this engine reads {FORMAT_VERSION}"
            )
        differing = spec_difference(self.manifest.spec, spec)
        if differing:
            keys = differing if len(spec_arguments(spec)[1]) > 8 else None  # long specs: only what differs
            self._mismatch(
                f"was recorded for {describe_spec(self.manifest.spec, keys)}, not {describe_spec(spec, keys)}"
            )
        differences = params_difference(self.manifest.params, self._as_infos(param_shapes))
        if differences:
            more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
            self._mismatch(f"records other parameters: {'; '.join(differences[:5])}{more}")
        if fingerprint is not None and fingerprint != self.manifest.fingerprint:
            self._mismatch(f"was recorded on data {self.manifest.fingerprint!r}, not {fingerprint!r}")

    def _check_hparams(self, hparams: dict[str, Any]) -> None:
        differing = spec_difference(self.manifest.hparams, hparams)
        if differing:
            stored, given = _flatten(self.manifest.hparams), _flatten(hparams)
            self._mismatch(
                "was recorded with "
                + ", ".join(f"{k}={stored.get(k)!r}" for k in differing)
                + ", not "
                + ", ".join(f"{k}={given.get(k)!r}" for k in differing)
            )

    def _as_infos(self, param_shapes: Mapping[str, Any]) -> list[ParamInfo]:
        stored = {p.name: p for p in self.manifest.params}
        infos = []
        for name, value in param_shapes.items():
            if isinstance(value, ParamInfo):
                infos.append(value)
            elif isinstance(value, Tensor):
                infos.extend(param_infos({name: value}))
            else:  # a bare shape: take the dtype as recorded
                dtype = stored[name].dtype if name in stored else "unknown"
                infos.append(ParamInfo(name=name, shape=list(value), dtype=dtype))
        return infos

    def _mismatch(self, what: str) -> None:
        raise StoreMismatch(f"store {storage.redact(self.url)} {what}")
    # --- paths -----------------------------------------------------------------------------------

    @property
    def num_epochs(self) -> int:
        """E: every complete expert has snapshots 0..E."""
        return self.manifest.epochs

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.manifest.params]

    def shard_url(self, expert_id: int) -> str:
        return storage.join(self.url, "experts", f"{expert_name(expert_id)}.safetensors")

    def sidecar_url(self, expert_id: int) -> str:
        return storage.join(self.url, "experts", f"{expert_name(expert_id)}.json")

    def partial_url(self, expert_id: int, *parts: str) -> str:
        return storage.join(self.url, "partial", expert_name(expert_id), *parts)

    def epoch_url(self, expert_id: int, epoch: int) -> str:
        return self.partial_url(expert_id, f"epoch-{epoch:04d}.safetensors")

    def _path(self, url: str) -> str:
        return storage.filesystem(url, self.storage_config)[1]

    def _refresh(self) -> None:
        """Forget cached listings (s3fs caches them) so other writers' files are seen."""
        self._fs.invalidate_cache()
    # --- reading ---------------------------------------------------------------------------------

    def experts(self) -> list[int]:
        """Ids of complete experts (those with a status sidecar), ascending."""
        self._refresh()
        folder = storage.join(self.url, "experts")
        if not storage.exists(folder, self.storage_config):
            return []
        names = [
            u.rsplit("/", 1)[-1] for u in storage.list_files(folder, self.storage_config, suffix=".json")
        ]
        ids = [int(n.removeprefix("expert-").removesuffix(".json")) for n in names if n.startswith("expert-")]
        return [i for i in sorted(ids) if self.status(i).status == "complete"]

    def status(self, expert_id: int) -> ExpertStatus:
        if expert_id not in self._status:
            url = self.sidecar_url(expert_id)
            if not storage.exists(url, self.storage_config):
                raise DataError(f"{storage.redact(url)}: expert {expert_id} is not complete in this store")
            self._status[expert_id] = ExpertStatus.model_validate(storage.read_json(url, self.storage_config))
        return self._status[expert_id]

    def verify(self, expert_id: int) -> ExpertStatus:
        """Check the shard's size and sha256 against its sidecar; DataError naming the file if not."""
        self._verified_bytes(expert_id)
        return self.status(expert_id)

    def _verified_bytes(self, expert_id: int) -> bytes:
        status, url = self.status(expert_id), self.shard_url(expert_id)
        data = storage.read_bytes(url, self.storage_config)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != status.bytes or digest != status.sha256:
            raise DataError(
                f"{storage.redact(url)}: {len(data)} bytes with sha256 {digest[:16]}…, the sidecar "
                f"says {status.bytes} bytes with {status.sha256[:16]}… (corrupt or overwritten shard)"
            )
        return data

    def load_expert(self, expert_id: int) -> dict[int, dict[str, Tensor]]:
        """All epochs of one expert, checksum verified: {epoch: {name: tensor}}."""
        out: dict[int, dict[str, Tensor]] = {}
        for key, tensor in load_safetensors(self._verified_bytes(expert_id)).items():
            epoch, name = split_snapshot_key(key)
            out.setdefault(epoch, {})[name] = tensor
        return {e: {n: out[e][n] for n in self.param_names} for e in sorted(out)}

    def iter_experts(self) -> Iterator[tuple[int, dict[int, dict[str, Tensor]]]]:
        """(expert id, all its epochs), one expert in memory at a time."""
        for expert_id in self.experts():
            yield expert_id, self.load_expert(expert_id)

    def load_epochs(
        self, expert_id: int, epochs: Sequence[int], names: Sequence[str] | None = None
    ) -> dict[int, dict[str, Tensor]]:
        """Only the requested epochs (and parameters) of an expert, fetched with ranged reads."""
        names = list(names) if names is not None else self.param_names
        self._check_request(epochs, names)
        data_start, header = self._header(expert_id)
        wanted = {(e, n): header[snapshot_key(n, e)] for e in epochs for n in names}
        chunks = self._read_ranges(
            expert_id, [tuple(info["data_offsets"]) for info in wanted.values()], data_start
        )
        out: dict[int, dict[str, Tensor]] = {e: {} for e in epochs}
        for (epoch, name), info in wanted.items():
            start, end = info["data_offsets"]
            out[epoch][name] = decode_tensor(_slice(chunks, start, end), info["dtype"], info["shape"])
        return out

    def _check_request(self, epochs: Sequence[int], names: Sequence[str]) -> None:
        bad_epochs = [e for e in epochs if not 0 <= e <= self.num_epochs]
        unknown = [n for n in names if n not in self.param_names]
        if bad_epochs or unknown:
            raise EngineError(
                f"store {storage.redact(self.url)} has epochs 0..{self.num_epochs} and parameters "
                f"{self.param_names}; asked for epochs {bad_epochs} / parameters {unknown}"
            )

    def _header(self, expert_id: int) -> tuple[int, dict[str, Any]]:
        """(data offset, header) of a shard, read with two small ranged reads and cached."""
        if expert_id not in self._headers:
            url, status = self.shard_url(expert_id), self.status(expert_id)
            path = self._path(url)
            size = self._fs.size(path)
            if size != status.bytes:
                raise DataError(f"{storage.redact(url)}: {size} bytes, the sidecar says {status.bytes}")
            length = int.from_bytes(self._fs.cat_file(path, start=0, end=8), "little")
            if not 0 < length < size - 8:
                raise DataError(f"{storage.redact(url)}: not a safetensors file (header length {length})")
            head = self._fs.cat_file(path, start=8, end=8 + length)
            self._headers[expert_id] = (8 + length, json.loads(head))
        return self._headers[expert_id]

    def _read_ranges(
        self, expert_id: int, ranges: list[tuple[int, int]], data_start: int
    ) -> list[tuple[int, bytes]]:
        path = self._path(self.shard_url(expert_id))
        return [
            (start, self._fs.cat_file(path, start=data_start + start, end=data_start + end))
            for start, end in merge_ranges(ranges)
        ]


def _slice(chunks: list[tuple[int, bytes]], start: int, end: int) -> bytes:
    """Bytes [start, end) of the data section from the merged chunks that were read."""
    for chunk_start, chunk in chunks:
        if chunk_start <= start and end <= chunk_start + len(chunk):
            return chunk[start - chunk_start : end - chunk_start]
    raise DataError(f"byte range {start}..{end} was not read")


def read_manifest(url: str, storage_config: StorageConfig | None = None) -> StoreManifest:
    manifest_url = storage.join(url, MANIFEST_NAME)
    if not storage.exists(manifest_url, storage_config):
        raise StorageError(f"{storage.redact(url)}: no trajectory store here ({MANIFEST_NAME} is missing)")
    return StoreManifest.model_validate(storage.read_json(manifest_url, storage_config))
