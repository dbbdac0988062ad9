"""The one outer loop of every distillation method.

    for iteration k = 0 … K−1:
        loss, gradients = method.gradients(synthetic, k, rank, W)      this worker's share (segments, classes…)
        sum both over the W data-parallel workers, divide by the total count
        a non-finite or exploding loss stops the run, naming the iteration; the last checkpoint stays
        unless loss > skip_loss_above (DATM): SGD with momentum on each learnable tensor (settings from
            method.optimizer()), then method.after_update (e.g. step sizes ≥ 0); optional EMA of the images
        every ``checkpoint_every`` iterations: write the state atomically (resume starts there)
        every ``snapshot_every`` iterations (optional): keep the set as it is then, for best-of evaluation

With W workers the result equals one process computing every share (tested for trajectory matching).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.checkpoint import safetensors_metadata
from engine.distill.base import CommonDistillConfig, DistillMethod
from engine.distill.synthetic import CHECKPOINT_NAME, SyntheticSet, snapshot_url
from engine.errors import EngineError
from engine.optim import sgd_step
from engine.progress import progress as progress_of
from engine.storage import StorageConfig

# Keys of the distill config that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "snapshot_every", "max_loss")
Reduce = Callable[[list[Tensor]], list[Tensor]]  # sums tensors over data-parallel workers


class DistillDiverged(EngineError):
    """The loss became non-finite or exploded."""


class Distiller:
    def __init__(
        self,
        config: CommonDistillConfig,
        synthetic: SyntheticSet,
        method: DistillMethod,
        out_url: str,
        storage_config: StorageConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        reduce: Reduce | None = None,
        on_iteration: Callable[[int, float, SyntheticSet], None] | None = None,
    ):
        self.config = config
        self.synthetic = synthetic
        self.method = method
        self.out_url = out_url
        self.storage_config = storage_config
        self.rank, self.world_size = rank, world_size
        self.reduce = reduce
        self.on_iteration = on_iteration
        self.settings = method.optimizer()
        for tensor in synthetic.learnable().values():
            tensor.requires_grad_(True)
        self.momentum = {name: torch.zeros_like(t) for name, t in synthetic.learnable().items()}
        self.ema = synthetic.images.detach().clone() if config.ema_decay else None
        self.iteration = 0
        self.history: list[dict[str, float]] = []  # mean loss per checkpoint interval
        self.losses: list[float] = []  # every iteration's
        self.skipped = 0  # iterations above distill.skip_loss_above, which updated nothing
        self.seconds = 0.0  # wall time of the iterations, over every resumption
        self._interval_losses: list[float] = []

    # --- one iteration ---------------------------------------------------------------------------

    def gradients(self, iteration: int) -> tuple[float, dict[str, Tensor]]:
        """Mean loss and mean gradients of ``iteration`` over every worker's share."""
        share = self.method.gradients(self.synthetic, iteration, self.rank, self.world_size)
        names = list(share.grad_sums)
        totals = [share.loss_sum, torch.tensor(float(share.count), dtype=torch.float64),
                  *share.grad_sums.values()]
        if self.reduce is not None:
            totals = self.reduce(totals)
        loss_sum, count, *grad_sums = totals
        return float(loss_sum) / float(count), {n: g / float(count) for n, g in zip(names, grad_sums, strict=True)}

    def check(self, iteration: int, loss: float, grads: dict[str, Tensor]) -> None:
        bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
        if math.isfinite(loss) and loss <= self.config.max_loss and not bad:
            return
        what = f"loss {loss:.4g}" + (f", non-finite gradients of {', '.join(bad)}" if bad else "")
        last = storage.join(self.out_url, CHECKPOINT_NAME)
        kept = (f"the last good checkpoint (iteration {self.iteration_of_checkpoint()}) is kept at "
                f"{storage.redact(last)}" if self.iteration_of_checkpoint() else "no checkpoint was written yet")
        raise DistillDiverged(f"iteration {iteration}: {what} (max_loss {self.config.max_loss:g}); {kept}; "
                              "lower the distill learning rates (lr_img, lr_lr) or the inner steps")

    @torch.no_grad()
    def update(self, grads: dict[str, Tensor]) -> None:
        for name, tensor in self.synthetic.learnable().items():
            sgd = self.settings[name]
            sgd_step([tensor], [grads[name]], [self.momentum[name]], sgd.lr, sgd.momentum, 0.0)
        self.method.after_update(self.synthetic)
        if self.ema is not None:
            self.ema.mul_(self.config.ema_decay).add_(self.synthetic.images.detach(), alpha=1 - self.config.ema_decay)

    # --- the run ---------------------------------------------------------------------------------

    def run(self, progress: bool = True) -> SyntheticSet:
        """Iterate to ``config.iterations``, resuming from the checkpoint in ``out_url`` if there is one."""
        self.resume()
        bar = progress_of(range(self.iteration, self.config.iterations), desc="distill", total=self.config.iterations,
                          initial=self.iteration, enabled=progress and self.rank == 0)
        for iteration in bar:
            started = time.perf_counter()
            loss, grads = self.gradients(iteration)
            self.check(iteration, loss, grads)
            if self.config.skip_loss_above is None or loss <= self.config.skip_loss_above:
                self.update(grads)
            else:
                self.skipped += 1
            self.iteration = iteration + 1
            self.seconds += time.perf_counter() - started
            self._interval_losses.append(loss)
            self.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.on_iteration is not None:
                self.on_iteration(self.iteration, loss, self.result())
            if self.iteration % self.config.checkpoint_every == 0 or self.iteration == self.config.iterations:
                self.save_checkpoint()
            if self.config.snapshot_every and self.iteration % self.config.snapshot_every == 0 and self.rank == 0:
                self.save_snapshot()
        return self.result()

    def result(self) -> SyntheticSet:
        """The synthetic set as output: EMA images if enabled, detached."""
        images = self.ema if self.ema is not None else self.synthetic.images
        s = self.synthetic
        return SyntheticSet(images.detach().clone(), s.alphas.detach().clone(),
                            None if s.labels is None else s.labels.detach().clone(),
                            None if s.text is None else s.text.detach().clone(), dict(s.metadata))

    # --- checkpoints and snapshots ---------------------------------------------------------------

    def _config_json(self) -> dict:
        return self.config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))

    def save_snapshot(self) -> None:
        result = self.result()
        result.metadata["iteration"] = self.iteration
        storage.write_bytes(snapshot_url(self.out_url, self.iteration), result.to_bytes(), self.storage_config)

    def save_checkpoint(self) -> None:
        if self._interval_losses:
            self.history.append({"iteration": self.iteration, "loss": float(np.mean(self._interval_losses))})
            self._interval_losses = []
        if self.rank != 0:
            return
        tensors = {f"synthetic/{k}": v.detach().cpu().contiguous() for k, v in self.synthetic.tensors().items()}
        tensors |= {f"momentum/{k}": v.cpu().contiguous() for k, v in self.momentum.items()}
        if self.ema is not None:
            tensors["ema"] = self.ema.cpu().contiguous()
        info = {"iteration": self.iteration, "config": self._config_json(), "history": self.history,
                "losses": self.losses, "skipped": self.skipped, "seconds": self.seconds,
                "method_state": self.method_state()}
        data = save_safetensors(tensors, metadata={"checkpoint": json.dumps(info, sort_keys=True)})
        storage.write_bytes(storage.join(self.out_url, CHECKPOINT_NAME), data, self.storage_config)

    def iteration_of_checkpoint(self) -> int:
        url = storage.join(self.out_url, CHECKPOINT_NAME)
        if not storage.exists(url, self.storage_config):
            return 0
        return json.loads(safetensors_metadata(storage.read_bytes(url, self.storage_config))["checkpoint"])["iteration"]

    @torch.no_grad()
    def resume(self) -> None:
        """Continue from ``out_url``'s checkpoint; refuse one written with other settings."""
        url = storage.join(self.out_url, CHECKPOINT_NAME)
        if not storage.exists(url, self.storage_config):
            return
        data = storage.read_bytes(url, self.storage_config)
        info = json.loads(safetensors_metadata(data)["checkpoint"])
        stored = info["config"]  # keys added to the config since the checkpoint was written are not compared
        differing = sorted(k for k, v in self._config_json().items() if k in stored and stored[k] != v)
        if differing:
            raise EngineError(
                f"{storage.redact(url)} was written with other distill settings ({', '.join(differing)}); "
                "use another run_dir or delete the checkpoint to start over"
            )
        tensors = load_safetensors(data)
        for name, tensor in self.synthetic.learnable().items():
            tensor.copy_(tensors[f"synthetic/{name}"])
            self.momentum[name].copy_(tensors[f"momentum/{name}"])
        if self.ema is not None:
            self.ema.copy_(tensors["ema"])
        self.iteration = int(info["iteration"])
        self.history = list(info["history"])
        self.losses = list(info.get("losses", []))  # checkpoints before per-iteration losses: the intervals only
        self.skipped = int(info.get("skipped", 0))
        self.seconds = float(info.get("seconds", 0.0))
        if info.get("method_state") and hasattr(self.method, "load_state"):
            self.method.load_state(info["method_state"])

    def method_state(self) -> dict:
        """What a method keeps across iterations besides the synthetic set (BiLP's pruned samples), as JSON."""
        return self.method.state() if hasattr(self.method, "state") else {}
