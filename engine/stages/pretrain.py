"""Pre-train an image tower by classification (e.g. ConvNet-3 on CIFAR-10) for image-text experiments.

No pretrained image encoder can be downloaded here, and a tower trained from scratch on a few hundred
image-text pairs leaves every method near chance (DESIGN section 3): the engine trains one itself,
once, and image-text models load it from ``ExperimentConfig.tower_checkpoint``. The run is the
experts' training loop (``train_expert``) on the ``pretrain`` section's data; the saved file is the
classifier's state dict (safetensors), which ``load_weights`` loads into a tower without its head.
"""

from __future__ import annotations

import os

from safetensors.torch import save_file

from engine import storage
from engine.data.preprocess import Preprocess
from engine.data.writers import ensure_shards
from engine.experiment import ExperimentConfig
from engine.models.params import select_parameters
from engine.models.registry import build_model
from engine.optim import build_seeded
from engine.stages import Runtime
from engine.stages.context import model_spec_for
from engine.trajectories.experts import EvalData, validation_metrics
from engine.trajectories.train import ExpertData, train_expert


def ensure_tower(config: ExperimentConfig, runtime: Runtime, log=print) -> str | None:
    """Train and save the tower unless its checkpoint exists; returns the checkpoint path (or None)."""
    path = config.tower_checkpoint
    if path is None or os.path.exists(path):
        return path
    pre = config.pretrain
    manifest = ensure_shards(pre.data.shards, pre.prepare, config.storage)
    train = runtime.load_split(pre.data, config.storage)
    preprocess = Preprocess.fit(train.images, pre.preprocess)
    data = ExpertData(preprocess.apply(train.images), train.labels)
    val = None
    if pre.val_split:
        held_out = runtime.load_split(pre.data.model_copy(update={"split": pre.val_split}), config.storage)
        val = EvalData(preprocess.apply(held_out.images), held_out.labels)
    spec = model_spec_for(pre.model, pre.data, manifest)
    model = build_seeded(lambda: build_model(spec), pre.seed)
    log(f"pre-training the image tower {spec.arch} on {storage.redact(pre.data.shards)} "
        f"({len(data.images):,} images, {pre.train.epochs} epochs) -> {path}")

    def report(epoch, params, state) -> None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in state.metrics.items())
        log(f"  pretrain epoch {epoch}: {shown}")

    train_expert(model, data, pre.train, recorded=select_parameters(model, "all"), seed=pre.seed, on_epoch=report,
                 eval_fn=(lambda m: validation_metrics(m, val, pre.train)) if val is not None else None)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"spec": spec.to_json()})
    os.replace(tmp, path)
    return path


