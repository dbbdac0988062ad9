"""Writing a trajectory store: claim an expert, save it epoch by epoch, then assemble its shard.

Every write is atomic, and an expert is resumable from its last saved epoch after any crash
(``resume_state``); ``record_expert`` is the buffer job's loop for one claimed expert.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine import storage
from engine.checkpoint import safetensors_metadata
from engine.data.stream import Batches
from engine.errors import DataError, EngineError
from engine.storage import StorageConfig
from engine.trajectories.lease import DEFAULT_LEASE_TIMEOUT_S, Leases
from engine.trajectories.store import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_KEY,
    ExpertStatus,
    StoreManifest,
    StoreMismatch,
    TrajectoryStore,
    _json_roundtrip,
    param_infos,
    params_difference,
    read_manifest,
    snapshot_key,
)
from engine.trajectories.train import (
    EpochCallback,
    EvalFn,
    ExpertConfig,
    ExpertData,
    Reduce,
    TrainState,
    train_expert,
)


class StoreWriter(TrajectoryStore):
    """A store opened for writing: claims experts through leases, writes epochs, finishes shards."""

    def __init__(self, url: str, manifest: StoreManifest, storage_config: StorageConfig | None = None, *,
                 owner: str | None = None, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> None:
        super().__init__(url, manifest, storage_config)
        self.leases = Leases(lambda expert_id: self.partial_url(expert_id, "lease.json"), storage_config, owner,
                             lease_timeout_s)

    @property
    def owner(self) -> str:
        return self.leases.owner

    def _held_by_other(self, expert_id: int) -> bool:
        self._refresh()
        return self.leases.held_by_other(expert_id)

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
    ) -> StoreWriter:
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
            owner=owner,
            lease_timeout_s=lease_timeout_s,
        )
        store.check_manifest(wanted)
        return store

    # --- writing ---------------------------------------------------------------------------------

    def pending(self, num_experts: int) -> list[int]:
        """Experts 0..num_experts-1 that are not complete and not held by a fresh lease of another owner."""
        complete = set(self.experts())
        return [i for i in range(num_experts) if i not in complete and not self._held_by_other(i)]

    def claim(self, expert_id: int) -> bool:
        """Take the lease of an expert unless it is complete or another owner's lease is fresh."""
        if expert_id in self.experts() or self._held_by_other(expert_id):
            return False
        self.leases.write(expert_id)
        self._refresh()
        lease = self.leases.read(expert_id)
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
        self._check_snapshot(params, epoch)
        self.leases.renew(expert_id)
        tensors = {name: params[name].detach().cpu().contiguous() for name in self.param_names}
        info = {
            "expert": expert_id,
            "epoch": epoch,
            "metrics": dict(metrics if metrics is not None else state.metrics),
        }
        data = save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
        storage.write_bytes(self.epoch_url(expert_id, epoch), data, self.storage_config)
        storage.write_bytes(
            self.partial_url(expert_id, "state.safetensors"), state.to_bytes(), self.storage_config
        )

    def finish(self, expert_id: int, seed: int, metrics: Mapping[str, Any] | None = None) -> ExpertStatus:
        """Assemble the shard from epochs 0..E, write it, then its sidecar, then drop the partial folder."""
        self.leases.renew(expert_id)
        missing = sorted(set(range(self.num_epochs + 1)) - set(self.saved_epochs(expert_id)))
        if missing:
            raise DataError(
                f"{storage.redact(self.partial_url(expert_id))}: epochs {missing} were never written"
            )
        tensors: dict[str, Tensor] = {}
        per_epoch: list[dict[str, float]] = []
        for epoch in range(self.num_epochs + 1):
            data = storage.read_bytes(self.epoch_url(expert_id, epoch), self.storage_config)
            per_epoch.append(json.loads(safetensors_metadata(data)[METADATA_KEY])["metrics"])
            tensors.update({snapshot_key(n, epoch): t for n, t in load_safetensors(data).items()})
        info = {
            "expert": expert_id,
            "epochs": self.num_epochs,
            "seed": seed,
            "metrics": per_epoch,
            "params": self.param_names,
            "format_version": FORMAT_VERSION,
        }
        shard = save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
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


def record_expert(
    store: TrajectoryStore,
    expert_id: int,
    model: nn.Module,
    data: ExpertData | Batches,
    config: ExpertConfig,
    *,
    recorded: Sequence[str],
    seed: int,
    eval_fn: EvalFn | None = None,
    on_epoch: EpochCallback | None = None,
    reduce: Reduce | None = None,
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
        model, data, config, recorded=recorded, seed=seed, on_epoch=save_epoch, resume=state, eval_fn=eval_fn,
        reduce=reduce,
    )
    # Which epoch this (last) attempt started from: 0 = from scratch, k = resumed after epoch k.
    return store.finish(expert_id, seed, {**final.metrics, "started_at_epoch": state.epoch if state else 0})
