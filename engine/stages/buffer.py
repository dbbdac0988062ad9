"""The buffer stage: train every expert of the store that is not complete, side by side where the runtime
allows (one Ray Tune trial per expert), each resuming from its last saved epoch.

    pre-train the image tower if the config has one and it is not cached -> write the shards if missing
    -> the training (and validation) split in the transform fitted on the training split
    -> open the trajectory store (refusing one recorded for another model, data or recipe)
    -> experts not yet complete, as long as any is claimable -> results.json + a table in <run_dir>/buffer/

Two jobs on one store share the work through leases.
"""

from __future__ import annotations

import time
from typing import Any

from engine import storage
from engine.config import to_yaml
from engine.data.manifest import ShardManifest
from engine.data.preprocess import Preprocess
from engine.experiment import ExperimentConfig
from engine.models.registry import ModelSpec
from engine.stages import Runtime
from engine.stages.context import (
    caption_features_of,
    caption_table,
    data_fingerprint,
    fitted_preprocess,
    load_split,
    model_spec,
    prepare_data,
    split_source,
)
from engine.stages.pretrain import ensure_tower
from engine.trajectories.experts import EvalData, ExpertPlan, TrainingData, open_store

POLL_SECONDS = 5.0


def build_plan(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec,
               runtime: Runtime) -> tuple[ExpertPlan, Preprocess]:
    """Everything an expert needs: the training split as a stream (only the kept samples when data selection
    keeps a subset; the input transform fitted in one streamed pass the first time), the validation split in
    memory (it is small), caption features for image-text data."""
    media = "video" if manifest.modality == "video" else "image"
    source = split_source(config, manifest, config.data.split, runtime, (media, "label", "key"))
    preprocess = fitted_preprocess(config, manifest, runtime)
    val = load_split(config, config.experts.val_split, runtime) if config.experts.val_split else None
    captions = None
    if manifest.modality == "image-text":
        captions = caption_table(config, manifest, spec, config.data.split, runtime)
        eval_data = validation_pairs(config, manifest, spec, val, preprocess)
    else:
        eval_data = EvalData(preprocess.apply(val.images), val.labels) if val else None
    plan = ExpertPlan(
        store_url=config.store_url, spec=spec, record=config.experts.record, train=config.experts.train,
        fingerprint=data_fingerprint(config, manifest),
        data=TrainingData(source, preprocess, config.data.shuffle_buffer, captions), eval_data=eval_data,
        seed=config.experts.seed, lease_timeout_s=config.experts.lease_timeout_s, storage_config=config.storage,
    )
    return plan, preprocess


def validation_pairs(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, val,
                     preprocess: Preprocess) -> EvalData | None:
    """Image-text validation: images, the features of every caption, the image of each caption."""
    if val is None:
        return None
    features = caption_features_of(config, manifest, spec, val.captions, config.experts.val_split)
    return EvalData(preprocess.apply(val.images), features.features, features.image_index)


def print_progress(expert: int, epoch: int, state) -> None:
    shown = ", ".join(f"{k} {v:.3f}" for k, v in state.metrics.items())
    print(f"expert {expert} epoch {epoch}: {shown}", flush=True)


def run(config: ExperimentConfig, runtime: Runtime) -> dict[str, Any]:
    """Train every expert that is not complete; returns the results written to <run_dir>/buffer/."""
    ensure_tower(config, runtime)  # image-text configs: the pre-trained image tower, trained once and cached
    manifest = prepare_data(config)
    spec = model_spec(config, manifest)
    plan, _ = build_plan(config, manifest, spec, runtime)  # the input transform is saved beside the store
    store = open_store(plan)
    num = config.experts.num_experts
    started = time.time()
    already = [i for i in store.experts() if i < num]
    while remaining := [i for i in range(num) if i not in store.experts()]:
        claimable = store.pending(num)
        if not claimable:  # every remaining expert is being trained by another job
            print(f"waiting for experts {remaining} held by other jobs", flush=True)
            time.sleep(POLL_SECONDS)
            continue
        runtime.train_experts(plan, claimable, print_progress)
    results = _results(store, num, already, time.time() - started)
    _write_outputs(config, results)
    return results


def _results(store, num: int, already: list[int], seconds: float) -> dict[str, Any]:
    experts = []
    for i in range(num):
        status = store.status(i)
        experts.append({"expert": i, "epochs": status.epochs, "seed": status.seed, "sha256": status.sha256,
                        "resumed_complete": i in already, "started_at_epoch": status.summary.get("started_at_epoch"),
                        "final": status.metrics[-1]})
    return {"store": store.url, "num_experts": num, "epochs": store.num_epochs, "seconds": round(seconds, 2),
            "experts": experts}


def results_table(results: dict[str, Any]) -> str:
    metric_names = sorted({k for e in results["experts"] for k in e["final"]})
    header = "| expert | " + " | ".join(metric_names) + " | note |"
    lines = [header, "|" + "---|" * (len(metric_names) + 2)]
    for e in results["experts"]:
        values = " | ".join(f"{e['final'].get(k, float('nan')):.3f}" for k in metric_names)
        lines.append(f"| {e['expert']} | {values} | {_note(e)} |")
    return "\n".join(lines)


def _note(expert: dict[str, Any]) -> str:
    if expert["resumed_complete"]:
        return "already complete"
    started = expert["started_at_epoch"]
    return f"resumed after epoch {started}" if started else ""


def _write_outputs(config: ExperimentConfig, results: dict[str, Any]) -> None:
    out = storage.join(config.run_dir, "buffer")
    storage.write_json(storage.join(out, "results.json"), results, config.storage)
    table = results_table(results)
    storage.write_text(storage.join(out, "results.md"), table + "\n", config.storage)
    storage.write_text(storage.join(out, "config.yaml"), to_yaml(config), config.storage)
    print(f"\n{results['num_experts']} experts x {results['epochs']} epochs in {results['store']} "
          f"({results['seconds']:.1f} s)\n{table}")
