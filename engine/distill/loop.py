"""The outer loop shared by every trajectory-matching method (MTT, vision-language distillation).

    for iteration k = 0 … K−1:
        for each segment j of the iteration (its own seed, so any worker can compute it):
            expert e, start t ~ sampling(k)                     θ*_t, θ*_{t+M} from the store
            problem = method.problem(synthetic, generator)     mini-batches and DSA draws of N steps
            L_j, ∂L_j = match_trajectory(problem, θ*_t, θ*_{t+M}, α, …)
        gradients averaged over all segments (all-reduced over data-parallel workers)
        a non-finite or exploding L stops the run, naming the iteration; the last checkpoint stays
        unless L > skip_loss_above (DATM): SGD with momentum on images, soft labels / text vectors and α;
        optional EMA of the images
        every ``checkpoint_every`` iterations: write the state atomically (resume starts there)
        every ``snapshot_every`` iterations (optional): keep the set as it is then, for best-of evaluation

With W workers, worker r computes segments r, r + W, …: the result equals one process computing
all of them (tested). The method supplies the synthetic set's inner problem and parameter groups.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm import tqdm

from engine import storage
from engine.distill.config import DistillConfig
from engine.distill.matching import InnerProblem, match_trajectory
from engine.distill.synthetic import CHECKPOINT_NAME, SyntheticSet, snapshot_url
from engine.errors import EngineError
from engine.models.params import flatten
from engine.storage import StorageConfig
from engine.trajectories.store import TrajectoryStore
from engine.trajectories.train import safetensors_metadata, sgd_step

# Keys of the distill config that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "snapshot_every", "max_loss")
Reduce = Callable[[list[Tensor]], list[Tensor]]  # sums tensors over data-parallel workers


class DistillDiverged(EngineError):
    """The matching loss became non-finite or exploded."""


class Method(Protocol):
    """What a distillation method supplies to the loop."""

    groups: Tensor  # (P,) parameter group of each recorded parameter (step size and distance)

    def problem(self, synthetic: SyntheticSet, generator: torch.Generator) -> InnerProblem: ...


@dataclass(frozen=True)
class Segment:
    expert: int
    start_epoch: int


class ExpertSegments:
    """Flat parameter vectors θ*_e of the store's experts, on ``device``, with a small LRU cache."""

    def __init__(self, store: TrajectoryStore, device: torch.device, cache_size: int = 128):
        self.store = store
        self.device = device
        self.experts = store.experts()
        if not self.experts:
            raise EngineError(f"store {storage.redact(store.url)} has no complete experts; run `distill buffer` first")
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def flat(self, expert: int, epoch: int) -> Tensor:
        key = (expert, epoch)
        if key not in self._cache:
            params = self.store.load_epochs(expert, [epoch])[epoch]
            self._cache[key] = flatten([params[n] for n in self.store.param_names]).to(self.device)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def sample(self, config: DistillConfig, iteration: int, generator: torch.Generator) -> Segment:
        if config.max_start_epoch + config.expert_epochs > self.store.num_epochs + 1:
            raise EngineError(
                f"distill.max_start_epoch {config.max_start_epoch} + expert_epochs {config.expert_epochs} "
                f"needs experts of {config.max_start_epoch + config.expert_epochs - 1} epochs; "
                f"store {storage.redact(self.store.url)} has {self.store.num_epochs}"
            )
        expert = self.experts[int(torch.randint(len(self.experts), (1,), generator=generator))]
        bound = config.start_epoch_bound(iteration)
        start = int(torch.randint(config.min_start_epoch, bound, (1,), generator=generator))
        return Segment(expert, start)


def segment_seed(seed: int, iteration: int, segment: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, segment]).generate_state(1, np.uint64)[0] >> 1)


class Distiller:
    def __init__(
        self,
        config: DistillConfig,
        synthetic: SyntheticSet,
        method: Method,
        segments: ExpertSegments,
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
        self.segments = segments
        self.out_url = out_url
        self.storage_config = storage_config
        self.rank, self.world_size = rank, world_size
        self.reduce = reduce
        self.on_iteration = on_iteration
        for tensor in synthetic.learnable().values():
            tensor.requires_grad_(True)
        self.momentum = {name: torch.zeros_like(t) for name, t in synthetic.learnable().items()}
        self.ema = synthetic.images.detach().clone() if config.ema_decay else None
        self.iteration = 0
        self.history: list[dict[str, float]] = []  # mean loss per checkpoint interval
        self.skipped = 0  # iterations above distill.skip_loss_above, which updated nothing
        self._interval_losses: list[float] = []

    # --- one iteration ---------------------------------------------------------------------------

    def segment_ids(self) -> range:
        """The segments of an iteration this worker computes."""
        return range(self.rank, self.config.segments_per_iteration * self.world_size, self.world_size)

    def gradients(self, iteration: int) -> tuple[float, dict[str, Tensor]]:
        """Mean matching loss and mean gradients over all segments of ``iteration`` (all workers)."""
        learnable = self.synthetic.learnable()
        leaves = [t for name, t in learnable.items() if name != "alphas"]
        total_loss = torch.zeros((), dtype=torch.float64)
        totals = [torch.zeros_like(t) for t in learnable.values()]
        for j in self.segment_ids():
            generator = torch.Generator().manual_seed(segment_seed(self.config.seed, iteration, j))
            segment = self.segments.sample(self.config, iteration, generator)
            start = self.segments.flat(segment.expert, segment.start_epoch)
            target = self.segments.flat(segment.expert, segment.start_epoch + self.config.expert_epochs)
            problem = self.method.problem(self.synthetic, generator)
            result = match_trajectory(problem, start, target, self.synthetic.alphas, self.method.groups,
                                      self.config.syn_steps, leaves, self.config.gradient, self.config.exact_stride)
            total_loss += result.loss
            for acc, grad in zip(totals, [*result.leaf_grads, result.alpha_grad], strict=True):
                acc += grad
        if self.reduce is not None:
            total_loss, *totals = self.reduce([total_loss, *totals])
        count = self.config.segments_per_iteration * self.world_size
        grads = {name: g / count for name, g in zip(learnable, totals, strict=True)}
        return float(total_loss) / count, grads

    def check(self, iteration: int, loss: float, grads: dict[str, Tensor]) -> None:
        bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
        if math.isfinite(loss) and loss <= self.config.max_loss and not bad:
            return
        what = f"matching loss {loss:.4g}" + (f", non-finite gradients of {', '.join(bad)}" if bad else "")
        last = storage.join(self.out_url, CHECKPOINT_NAME)
        kept = (f"the last good checkpoint (iteration {self.iteration_of_checkpoint()}) is kept at "
                f"{storage.redact(last)}" if self.iteration_of_checkpoint() else "no checkpoint was written yet")
        raise DistillDiverged(f"iteration {iteration}: {what} (max_loss {self.config.max_loss:g}); {kept}; "
                              "lower distill.lr_img / lr_lr or distill.syn_steps")

    @torch.no_grad()
    def update(self, grads: dict[str, Tensor]) -> None:
        lrs = {"images": self.config.lr_img, "labels": self.config.lr_label, "alphas": self.config.lr_lr,
               "text": self.config.lr_text or self.config.lr_img}
        for name, tensor in self.synthetic.learnable().items():
            momentum = self.config.label_momentum if name == "labels" else self.config.momentum
            sgd_step([tensor], [grads[name]], [self.momentum[name]], lrs[name], momentum, 0.0)
        self.synthetic.alphas.clamp_(min=0.0)  # a negative step size would make the student ascend
        if self.ema is not None:
            self.ema.mul_(self.config.ema_decay).add_(self.synthetic.images.detach(), alpha=1 - self.config.ema_decay)

    # --- the run ---------------------------------------------------------------------------------

    def run(self, progress: bool = True) -> SyntheticSet:
        """Iterate to ``config.iterations``, resuming from the checkpoint in ``out_url`` if there is one."""
        self.resume()
        bar = tqdm(range(self.iteration, self.config.iterations), desc="distill", unit="it", dynamic_ncols=True,
                   disable=not progress or self.rank != 0, initial=self.iteration, total=self.config.iterations)
        for iteration in bar:
            loss, grads = self.gradients(iteration)
            self.check(iteration, loss, grads)
            if self.config.skip_loss_above is None or loss <= self.config.skip_loss_above:
                self.update(grads)
            else:
                self.skipped += 1
            self.iteration = iteration + 1
            self._interval_losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.synthetic.alphas.mean().item():.3g}")
            if self.on_iteration is not None:
                self.on_iteration(self.iteration, loss, self.result())
            if self.iteration % self.config.checkpoint_every == 0 or self.iteration == self.config.iterations:
                self.save_checkpoint()
            if self.config.snapshot_every and self.iteration % self.config.snapshot_every == 0 and self.rank == 0:
                result = self.result()
                result.metadata["iteration"] = self.iteration
                storage.write_bytes(snapshot_url(self.out_url, self.iteration), result.to_bytes(), self.storage_config)
        return self.result()

    def result(self) -> SyntheticSet:
        """The synthetic set as output: EMA images if enabled, detached."""
        images = self.ema if self.ema is not None else self.synthetic.images
        s = self.synthetic
        return SyntheticSet(images.detach().clone(), s.alphas.detach().clone(),
                            None if s.labels is None else s.labels.detach().clone(),
                            None if s.text is None else s.text.detach().clone(), dict(s.metadata))

    # --- checkpoints -----------------------------------------------------------------------------

    def _config_json(self) -> dict:
        return self.config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))

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
                "experts": self.segments.experts, "skipped": self.skipped}
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
        differing = sorted(k for k, v in self._config_json().items() if info["config"].get(k) != v)
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
        self.skipped = int(info.get("skipped", 0))


def minibatch_schedule(num: int, batch: int | None, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Index mini-batches for ``steps`` student steps: consecutive chunks of seeded permutations."""
    if batch is None or batch >= num:
        return [torch.arange(num)] * steps
    out: list[Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(num, generator=generator)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def repeat_groups(sizes: Sequence[int]) -> Tensor:
    """(P,) group index from the number of parameters in each group, in order."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
