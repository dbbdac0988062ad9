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
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine import storage
from engine.errors import DataError, EngineError, StorageError
from engine.storage import StorageConfig
from engine.trajectories.train import (
    EpochCallback,
    EvalFn,
    ExpertConfig,
    ExpertData,
    TrainState,
    safetensors_metadata,
    train_expert,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_LEASE_TIMEOUT_S = 600.0
_METADATA_KEY = "trajectory"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StoreMismatch(EngineError):
    """An existing store was recorded for another model, parameter set, data set or recipe."""


class LeaseLost(EngineError):
    """Another writer holds a fresh lease on the expert this writer is working on."""


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


class Lease(_Model):
    owner: str
    heartbeat: float = Field(description="Unix time of the owner's last renewal.")


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


def default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` (from default_owner) was a process on this host that no longer runs.

    Lets a job rerun right after a crash or SIGKILL take over its own experts at once instead of
    waiting for the lease to time out. Owners on other hosts are judged by the timeout alone.
    """
    parts = owner.rsplit("-", 2)  # host (may contain '-'), pid, random suffix
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


def read_safetensors_header(head: bytes) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict) from the start of a safetensors file."""
    length = int.from_bytes(head[:8], "little")
    return 8 + length, json.loads(head[8 : 8 + length])


def decode_tensor(raw: bytes, dtype: str, shape: list[int]) -> Tensor:
    torch_dtype = _DTYPES[dtype]
    if not raw:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)


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
    """Read (and, when opened by ``create_or_open``, write) expert trajectories under ``url``."""

    def __init__(
        self,
        url: str,
        manifest: StoreManifest,
        storage_config: StorageConfig | None = None,
        *,
        writable: bool = False,
        owner: str | None = None,
        lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.manifest = manifest
        self.storage_config = storage_config
        self.writable = writable
        self.owner = owner or default_owner()
        self.lease_timeout_s = lease_timeout_s
        self._fs = storage.filesystem(self.url, storage_config)[0]
        self._status: dict[int, ExpertStatus] = {}
        self._headers: dict[int, tuple[int, dict[str, Any]]] = {}

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def create_or_open(
        cls,
        url: str,
        spec: dict[str, Any] | BaseModel,
        params: Mapping[str, Tensor],
        fingerprint: str,
        hparams: dict[str, Any],
        storage_config: StorageConfig | None = None,
        *,
        owner: str | None = None,
        lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
    ) -> TrajectoryStore:
        """Open the store at ``url`` for writing, creating its manifest if there is none.

        ``spec`` is the model spec (a JSON dict or a pydantic model such as ``ModelSpec``); ``params``
        the recorded parameters (name -> tensor); ``hparams`` what determines a trajectory (the
        ``ExpertConfig``; it must include ``epochs``), not how many experts a job trains.
        Raises StoreMismatch if the existing store differs in spec, parameters, fingerprint or hparams.
        """
        if "epochs" not in hparams:
            raise EngineError(f"store {storage.redact(url)}: hparams must include 'epochs'")
        wanted = StoreManifest(
            spec=_json_roundtrip(spec),
            params=param_infos(params),
            fingerprint=fingerprint,
            hparams=_json_roundtrip(hparams),
        )
        manifest_url = storage.join(url, MANIFEST_NAME)
        if not storage.exists(manifest_url, storage_config):
            storage.write_json(manifest_url, wanted.model_dump(mode="json"), storage_config)
        store = cls(
            url,
            read_manifest(url, storage_config),
            storage_config,
            writable=True,
            owner=owner,
            lease_timeout_s=lease_timeout_s,
        )
        store.check_manifest(wanted)
        return store

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

    # --- writing ---------------------------------------------------------------------------------

    def pending(self, num_experts: int) -> list[int]:
        """Experts 0..num_experts-1 that are not complete and not held by a fresh lease of another owner."""
        complete = set(self.experts())
        return [i for i in range(num_experts) if i not in complete and not self._held_by_other(i)]

    def claim(self, expert_id: int) -> bool:
        """Take the lease of an expert unless it is complete or another owner's lease is fresh."""
        self._require_writable()
        if expert_id in self.experts() or self._held_by_other(expert_id):
            return False
        self._write_lease(expert_id)
        self._refresh()
        lease = self._read_lease(expert_id)
        return lease is not None and lease.owner == self.owner

    def resume_state(self, expert_id: int) -> tuple[TrainState | None, list[int]]:
        """The saved TrainState of a partial expert (None: start over) and the epochs saved so far.

        The state is used only if every epoch file up to its epoch exists.
        """
        saved = self.saved_epochs(expert_id)
        state_url = self.partial_url(expert_id, "state.safetensors")
        if not storage.exists(state_url, self.storage_config):
            return None, saved
        state = TrainState.from_bytes(storage.read_bytes(state_url, self.storage_config))
        if not set(range(state.epoch + 1)) <= set(saved):
            return None, saved
        return state, saved

    def saved_epochs(self, expert_id: int) -> list[int]:
        self._refresh()
        folder = self.partial_url(expert_id)
        if not storage.exists(folder, self.storage_config):
            return []
        names = [
            u.rsplit("/", 1)[-1] for u in storage.list_files(folder, self.storage_config, ".safetensors")
        ]
        return sorted(int(n[len("epoch-") : -len(".safetensors")]) for n in names if n.startswith("epoch-"))

    def write_epoch(
        self,
        expert_id: int,
        epoch: int,
        params: Mapping[str, Tensor],
        state: TrainState,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Save one epoch's parameters, then the state to resume from it; renews the lease."""
        self._require_writable()
        self._check_snapshot(params, epoch)
        self._renew_lease(expert_id)
        tensors = {name: params[name].detach().cpu().contiguous() for name in self.param_names}
        info = {
            "expert": expert_id,
            "epoch": epoch,
            "metrics": dict(metrics if metrics is not None else state.metrics),
        }
        data = save_safetensors(tensors, metadata={_METADATA_KEY: json.dumps(info, sort_keys=True)})
        storage.write_bytes(self.epoch_url(expert_id, epoch), data, self.storage_config)
        storage.write_bytes(
            self.partial_url(expert_id, "state.safetensors"), state.to_bytes(), self.storage_config
        )

    def finish(self, expert_id: int, seed: int, metrics: Mapping[str, Any] | None = None) -> ExpertStatus:
        """Assemble the shard from epochs 0..E, write it, then its sidecar, then drop the partial folder."""
        self._require_writable()
        self._renew_lease(expert_id)
        missing = sorted(set(range(self.num_epochs + 1)) - set(self.saved_epochs(expert_id)))
        if missing:
            raise DataError(
                f"{storage.redact(self.partial_url(expert_id))}: epochs {missing} were never written"
            )
        tensors: dict[str, Tensor] = {}
        per_epoch: list[dict[str, float]] = []
        for epoch in range(self.num_epochs + 1):
            data = storage.read_bytes(self.epoch_url(expert_id, epoch), self.storage_config)
            per_epoch.append(json.loads(safetensors_metadata(data)[_METADATA_KEY])["metrics"])
            tensors.update({snapshot_key(n, epoch): t for n, t in load_safetensors(data).items()})
        info = {
            "expert": expert_id,
            "epochs": self.num_epochs,
            "seed": seed,
            "metrics": per_epoch,
            "params": self.param_names,
            "format_version": FORMAT_VERSION,
        }
        shard = save_safetensors(tensors, metadata={_METADATA_KEY: json.dumps(info, sort_keys=True)})
        storage.write_bytes(self.shard_url(expert_id), shard, self.storage_config)
        status = ExpertStatus(
            expert=expert_id,
            shard=self.shard_url(expert_id).rsplit("/", 1)[-1],
            epochs=self.num_epochs,
            seed=seed,
            sha256=hashlib.sha256(shard).hexdigest(),
            bytes=len(shard),
            metrics=per_epoch,
            summary=dict(metrics or {}),
        )
        storage.write_json(self.sidecar_url(expert_id), status.model_dump(mode="json"), self.storage_config)
        storage.remove(self.partial_url(expert_id), self.storage_config)
        self._refresh()
        return status

    def _check_snapshot(self, params: Mapping[str, Tensor], epoch: int) -> None:
        if not 0 <= epoch <= self.num_epochs:
            raise EngineError(
                f"store {storage.redact(self.url)} records epochs 0..{self.num_epochs}, not {epoch}"
            )
        differences = params_difference(self.manifest.params, param_infos(params))
        if differences:
            raise StoreMismatch(f"store {storage.redact(self.url)}: epoch {epoch}: {'; '.join(differences)}")

    def _require_writable(self) -> None:
        if not self.writable:
            raise EngineError(f"store {storage.redact(self.url)} was opened read-only; use create_or_open")

    # --- leases ----------------------------------------------------------------------------------

    def _read_lease(self, expert_id: int) -> Lease | None:
        url = self.partial_url(expert_id, "lease.json")
        try:
            return Lease.model_validate(storage.read_json(url, self.storage_config))
        except StorageError:  # no lease file (or a half-visible one): nobody holds it
            return None

    def _held_by_other(self, expert_id: int) -> bool:
        self._refresh()
        lease = self._read_lease(expert_id)
        return (
            lease is not None
            and lease.owner != self.owner
            and time.time() - lease.heartbeat < self.lease_timeout_s
            and not owner_is_dead(lease.owner)
        )

    def _write_lease(self, expert_id: int) -> None:
        lease = Lease(owner=self.owner, heartbeat=time.time())
        storage.write_json(
            self.partial_url(expert_id, "lease.json"), lease.model_dump(mode="json"), self.storage_config
        )

    def _renew_lease(self, expert_id: int) -> None:
        if self._held_by_other(expert_id):
            raise LeaseLost(
                f"{storage.redact(self.partial_url(expert_id, 'lease.json'))}: "
                f"expert {expert_id} was taken over by another writer"
            )
        self._write_lease(expert_id)


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


def record_expert(
    store: TrajectoryStore,
    expert_id: int,
    model: nn.Module,
    data: ExpertData,
    config: ExpertConfig,
    *,
    recorded: Sequence[str],
    seed: int,
    eval_fn: EvalFn | None = None,
    on_epoch: EpochCallback | None = None,
) -> ExpertStatus:
    """Train (or resume) one expert into the store: the buffer job's loop for one claimed expert.

    ``model`` must be freshly built from the same seed as any earlier attempt (frozen parameters are
    not saved). Epochs already saved are not retrained; ``on_epoch`` is called after each new one.
    """
    if config.epochs != store.num_epochs:
        raise StoreMismatch(
            f"store {storage.redact(store.url)} records {store.num_epochs} epochs, "
            f"the config trains {config.epochs}"
        )
    state, _ = store.resume_state(expert_id)
    if state is not None and state.seed != seed:
        raise EngineError(f"{store.partial_url(expert_id)}: saved with seed {state.seed}, not {seed}")

    def save_epoch(epoch: int, params: dict[str, Tensor], epoch_state: TrainState) -> None:
        store.write_epoch(expert_id, epoch, params, epoch_state)
        if on_epoch is not None:
            on_epoch(epoch, params, epoch_state)

    final = train_expert(
        model, data, config, recorded=recorded, seed=seed, on_epoch=save_epoch, resume=state, eval_fn=eval_fn
    )
    # Which epoch this (last) attempt started from: 0 = from scratch, k = resumed after epoch k.
    return store.finish(expert_id, seed, {**final.metrics, "started_at_epoch": state.epoch if state else 0})
