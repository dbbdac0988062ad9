"""The labels stage: label-space lightening (HeLlO) measured against a soft-label store and hard labels.

    teacher        expert labels.teacher_expert of the trajectory store at labels.teacher_epoch (the last)
    images         for each of labels.images, ipc per class: random real images | RDED stitched patches |
                   the distilled set; <run_dir>/labels/<images>/images.safetensors and grid.png
    soft-stored    the teacher's logits of every view of every student epoch, in
                   <run_dir>/labels/<images>/soft-labels/ (engine.labels.store)
    hello          the projector: the dual encoder of labels.encoder (expert 0 of <run_dir>/labels/encoder),
                   zero-shot from the class prompts, then its adapters fitted on the real training stream to
                   the weak teachers (labels.projector.teacher_epochs); <run_dir>/labels/projector/
    students       for every (images, kind of labels): evaluate.repeats fresh networks trained by one loop
                   on the same views (engine.labels.student), scored on evaluate.split
    -> <run_dir>/labels/results.json {"header", "rows"} (accuracy, label_bytes, image_bytes), results.md
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine import storage
from engine.data.grid import save_grid
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError
from engine.evaluate.metrics import accuracy
from engine.evaluate.run import row
from engine.evaluate.train import Scores
from engine.experiment import ExperimentConfig
from engine.labels.config import LabelsConfig
from engine.labels.hello import (
    adapter_state,
    build_projector,
    class_prompts,
    fit_projector,
    load_adapter_state,
)
from engine.labels.rded import rded_images
from engine.labels.store import ReplayedViews, SoftLabelStore, tensor_fingerprint
from engine.labels.student import DrawnViews, train_student
from engine.labels.views import ViewsConfig, crop_and_flip, draw_epoch, render
from engine.models.clip import text_settings
from engine.models.params import count_parameters
from engine.models.registry import build_model
from engine.optim import build_seeded
from engine.provenance import package_versions, source_commit
from engine.resources import default_device
from engine.seeds import evaluation_seeds
from engine.stages import Runtime
from engine.stages.context import (
    data_fingerprint,
    distill_dir,
    expert_snapshot,
    load_preprocess,
    model_spec,
    prepare_data,
)
from engine.stages.evaluate import Experiment

RESULTS = "results.json"


def labels_dir(config: ExperimentConfig, *parts: str) -> str:
    return storage.join(config.run_dir, "labels", *parts)


class OnInputs(nn.Module):
    """``model`` applied to inputs of another input transform: ``to_model`` maps them into its own."""

    def __init__(self, model: nn.Module, to_model: Callable[[Tensor], Tensor]):
        super().__init__()
        self.model, self.to_model = model, to_model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.to_model(x))


# --- the synthetic images -----------------------------------------------------------------------------


def image_set(config: ExperimentConfig, experiment: Experiment, kind: str, teacher: nn.Module,
              teacher_id: str) -> tuple[Tensor, Tensor]:
    """(images (classes·ipc, C, H, W) in model-input space, hard labels) of ``kind``, cached in
    <run_dir>/labels/<kind>/images.safetensors under a key of what they depend on."""
    labels = config.labels
    key = json.dumps({"kind": kind, "ipc": labels.ipc, "seed": labels.seed, "data": data_fingerprint(
        config, experiment.manifest), "teacher": teacher_id if kind == "rded" else None,
        "rded": labels.rded.model_dump() if kind == "rded" else None}, sort_keys=True)
    url = labels_dir(config, kind, "images.safetensors")
    if kind != "distilled" and storage.exists(url, config.storage):  # a distilled set is read from its folder
        data = storage.read_bytes(url, config.storage)
        tensors = load_safetensors(data)
        if _metadata(data).get("key") == key:
            return tensors["images"], tensors["labels"]
    if kind == "random":
        images, targets = experiment.pool.coreset("random", labels.ipc, labels.seed)
    elif kind == "rded":
        images, targets = rded_from_stream(config, experiment, teacher)
    else:
        synthetic = SyntheticSet.load(distill_dir(config, labels.ipc), config.storage)
        images = synthetic.images
        targets = synthetic.labels.argmax(1) if synthetic.soft_labels else synthetic.labels
    images, targets = images.detach().cpu().float().contiguous(), targets.cpu().long().contiguous()
    storage.write_bytes(url, save_safetensors({"images": images, "labels": targets}, metadata={"key": key}),
                        config.storage)
    names = [experiment.manifest.class_names[int(t)] for t in targets]
    save_grid(experiment.preprocess.inverse(images.to(experiment.device)).cpu(), labels_dir(config, kind, "grid.png"),
              nrow=labels.ipc, labels=names, storage_config=config.storage)
    return images, targets


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


def rded_from_stream(config: ExperimentConfig, experiment: Experiment, teacher: nn.Module) -> tuple[Tensor, Tensor]:
    """RDED images from ``labels.rded.images_per_class`` real images per class, fetched in one streamed pass."""
    labels, rded = config.labels, config.labels.rded
    generator = torch.Generator().manual_seed(labels.seed)
    classes = len(experiment.manifest.classes)
    positions = []
    for c in range(classes):
        members = (experiment.labels == c).nonzero().flatten()
        positions.append(members[torch.randperm(len(members), generator=generator)[:rded.images_per_class]])
    chosen = torch.cat(positions)
    fetched, fetched_labels = experiment.train_images[chosen], experiment.labels[chosen]
    return rded_images(lambda c: fetched[(fetched_labels == c).to(fetched.device)], classes, teacher, labels.ipc,
                       rded, labels.seed)


# --- the projector ------------------------------------------------------------------------------------


def ensure_projector(config: ExperimentConfig, experiment: Experiment, weak_teachers: list[nn.Module],
                     log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """The HeLlO projector on this config's model inputs: built on the encoder's expert 0, its adapters
    loaded from <run_dir>/labels/projector/ or fitted there; returns it and what to report of it."""
    labels, cfg = config.labels, config.labels.projector
    encoder_config = config.label_encoder()
    encoder_manifest = prepare_data(encoder_config)
    encoder = expert_snapshot(encoder_config, encoder_manifest, 0, None, experiment.device)
    spec = model_spec(encoder_config, encoder_manifest)
    names = experiment.manifest.class_names
    prompts = class_prompts(names, cfg.template)
    text = text_settings(spec.kwargs).load().embed_captions(prompts).to(experiment.device)
    with torch.no_grad():
        class_text = encoder.encode_text_features(text)
    projector = build_projector(encoder, class_text, encoder_config.experts.train.temperature, cfg).to(experiment.device)
    encoder_pre, own_pre = load_preprocess(encoder_config).to(experiment.device), experiment.preprocess
    on_inputs = OnInputs(projector, lambda x: encoder_pre.apply(own_pre.inverse(x)))

    val_split = config.experts.val_split or "val"
    val = experiment.held_out(val_split)
    val_x, val_y = own_pre.apply(val.images.to(experiment.device)), val.labels.to(experiment.device)
    zero_shot = accuracy(on_inputs, val_x, val_y)
    log(f"projector: zero-shot {zero_shot:.2f} % on the {val_split} split ({len(val_y):,} images; prompts like "
        f"{prompts[0]!r})")

    identity = {"classes": names, "template": cfg.template, "encoder": storage.redact(encoder_config.store_url),
                "encoder_data": data_fingerprint(encoder_config, encoder_manifest),
                "projector": cfg.model_dump(mode="json"), "data": data_fingerprint(config, experiment.manifest)}
    url = labels_dir(config, "projector", "adapters.safetensors")
    info_url = labels_dir(config, "projector", "projector.json")
    if storage.exists(info_url, config.storage) and storage.exists(url, config.storage):
        stored = storage.read_json(info_url, config.storage)
        if stored["identity"]["classes"] != names:
            raise DataError(f"{storage.redact(info_url)}: a projector for another class list "
                            f"({len(stored['identity']['classes'])} classes: {stored['identity']['classes'][:3]}...)")
        if stored["identity"] == identity:
            try:
                load_adapter_state(projector, load_safetensors(storage.read_bytes(url, config.storage)),
                                   storage.redact(url))
            except ValueError as err:
                raise DataError(str(err)) from None
            log(f"projector adapters: {storage.redact(url)} (already fitted)")
            return on_inputs, stored["report"]
    log(f"fitting the projector's adapters to {len(weak_teachers)} teacher(s) (epochs "
        f"{cfg.teacher_epochs or [labels.teacher_epoch or 'last']}) on the training stream")
    augment_views = ViewsConfig(scale_min=labels.student.views.scale_min, flip=True, cutmix=0.0)
    generator = torch.Generator().manual_seed(labels.seed)

    def augment(x: Tensor) -> Tensor:
        drawn = draw_epoch(len(x), len(x), x.shape[-1], augment_views, generator)
        return crop_and_flip(x, drawn.boxes, drawn.flips)

    batches = experiment.training_batches(labels.seed, cfg.batch_size)
    history = fit_projector(on_inputs, batches.epoch, weak_teachers, cfg, augment, log)
    data = save_safetensors(adapter_state(projector, getattr(torch, cfg.store_dtype)))
    storage.write_bytes(url, data, config.storage)
    state = load_safetensors(data)
    load_adapter_state(projector, state, storage.redact(url))  # students are labelled by what is stored
    adapted = accuracy(on_inputs, val_x, val_y)
    stored_parameters = sum(t.numel() for t in state.values())
    trainable, total = count_parameters(projector)
    report = {"zero_shot_accuracy": round(zero_shot, 4), "adapted_accuracy": round(adapted, 4),
              "val_split": val_split, "stored_parameters": stored_parameters, "stored_bytes": len(data),
              "trainable_parameters": trainable, "total_parameters": total, "fit_loss": history}
    storage.write_json(info_url, {"identity": identity, "report": report}, config.storage)
    log(f"projector: {adapted:.2f} % on the {val_split} split after fitting (zero-shot {zero_shot:.2f} %); "
        f"stores {stored_parameters:,} parameters, {len(data):,} bytes ({storage.redact(url)})")
    return on_inputs, report



# --- students -----------------------------------------------------------------------------------------


def soft_label_store(config: ExperimentConfig, kind: str, images: Tensor, teacher: nn.Module,
                     teacher_id: str, device: torch.device) -> SoftLabelStore:
    """The teacher's logits of every student view of ``images``, written once (resuming by epoch)."""
    labels, student = config.labels, config.labels.student
    views_key = json.dumps({"views": student.views.model_dump(), "seed": labels.seed}, sort_keys=True)
    fingerprint = {"images": tensor_fingerprint([images]), "teacher": teacher_id,
                   "views": tensor_fingerprint([torch.tensor(list(views_key.encode()))])}
    store = SoftLabelStore.open(labels_dir(config, kind, "soft-labels"), fingerprint, student.epochs,
                                student.batch_size, int(teacher(images[:1].to(device)).shape[1]), config.storage)
    drawn = DrawnViews(len(images), images.shape[-1], student, labels.seed)
    on_device = images.to(device)

    @torch.no_grad()
    def label(views, b):
        return teacher(render(on_device, views, b))

    store.fill(drawn.views, label)
    return store


def student_rows(config: ExperimentConfig, experiment: Experiment, kind: str, images: Tensor, targets: Tensor,
                 sources: dict[str, tuple[Any, int]], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per kind of labels: ``sources`` kind -> (ViewLabels, label bytes)."""
    ev, student = config.evaluate, config.labels.student
    seeds = evaluation_seeds(ev.seed, ev.repeats)
    image_bytes = images.numel() * images.element_size()
    rows = []
    for label_kind, (source, label_bytes) in sources.items():
        runs = []
        for seed in seeds:
            model = build_seeded(lambda: build_model(experiment.spec), seed).to(experiment.device)
            train_student(model, images, targets, source, student, seed)
            runs.append(accuracy(model, experiment.task.images, experiment.task.labels))
        scores = Scores(runs, list(seeds))
        log(f"  {label_kind:<12} {kind:<10} {len(images) // len(experiment.manifest.classes):>4}  accuracy "
            f"{scores.mean:6.2f} ± {scores.std:.2f}  label bytes {label_bytes:,}")
        rows.append(row(f"{label_kind}:{kind}", config.labels.ipc, scores, "accuracy", labels=label_kind,
                        images=kind, label_bytes=label_bytes, image_bytes=image_bytes, epochs=student.epochs))
    return rows


@dataclass
class Given:
    """What a kind of labels is built from, for one image set."""

    config: ExperimentConfig
    kind: str  # the image source
    images: Tensor
    teacher: nn.Module
    teacher_id: str
    device: torch.device
    projector: nn.Module | None
    projector_report: dict[str, Any] | None


def drawn_views(given: Given, label: Callable[[Tensor], Tensor] | None = None) -> DrawnViews:
    labels = given.config.labels
    return DrawnViews(len(given.images), given.images.shape[-1], labels.student, labels.seed, label=label)


def stored_labels(given: Given) -> tuple[Any, int]:
    store = soft_label_store(given.config, given.kind, given.images, given.teacher, given.teacher_id, given.device)
    return ReplayedViews(store), store.bytes


# labels.kinds -> (the student's views and their soft labels, the bytes they need stored)
VIEW_LABELS: dict[str, Callable[[Given], tuple[Any, int]]] = {
    "hard": lambda given: (drawn_views(given), 0),
    "soft-stored": stored_labels,
    "hello": lambda given: (drawn_views(given, label=given.projector), given.projector_report["stored_bytes"]),
}


def run(config: ExperimentConfig, runtime: Runtime, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every image source under every kind of labels; writes and returns the rows."""
    labels: LabelsConfig = config.labels
    device = default_device()
    experiment = Experiment(config, runtime, config.evaluate.split, device)
    manifest = experiment.manifest
    teacher = expert_snapshot(config, manifest, labels.teacher_expert, labels.teacher_epoch, device)
    teacher_id = tensor_fingerprint(dict(teacher.state_dict()))
    log(f"teacher: expert {labels.teacher_expert} at epoch {labels.teacher_epoch or 'last'} of "
        f"{storage.redact(config.store_url)}: {accuracy(teacher, experiment.task.images, experiment.task.labels):.2f} "
        f"% on the {config.evaluate.split} split")
    projector, projector_report = None, None
    if "hello" in labels.kinds:
        epochs = labels.projector.teacher_epochs
        weak = [teacher] if epochs is None else [expert_snapshot(config, manifest, labels.teacher_expert, e, device)
                                                 for e in epochs]
        projector, projector_report = ensure_projector(config, experiment, weak, log)
    rows = []
    for kind in labels.images:
        images, targets = image_set(config, experiment, kind, teacher, teacher_id)
        log(f"{kind} images: {len(images)} ({labels.ipc} per class) in {storage.redact(labels_dir(config, kind))}")
        given = Given(config, kind, images, teacher, teacher_id, device, projector, projector_report)
        sources = {label_kind: VIEW_LABELS[label_kind](given) for label_kind in labels.kinds}
        rows += student_rows(config, experiment, kind, images, targets, sources, log)
    header = {"split": config.evaluate.split, "data": data_fingerprint(config, manifest), "ipc": labels.ipc,
              "teacher": {"expert": labels.teacher_expert, "epoch": labels.teacher_epoch, "id": teacher_id},
              "projector": projector_report, "student": labels.student.model_dump(mode="json"),
              "evaluation_seeds": evaluation_seeds(config.evaluate.seed, config.evaluate.repeats),
              "model": (config.evaluate.model or config.model).model_dump(mode="json"),
              "versions": package_versions(), "commit": source_commit(),
              "created": datetime.now(UTC).isoformat(timespec="seconds")}
    write_results(config, header, rows, log)
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| images | labels | accuracy | label bytes | image bytes |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['labels']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['label_bytes']:,} "
                     f"| {r['image_bytes']:,} |")
    return "\n".join(lines) + "\n"


def write_results(config: ExperimentConfig, header: dict[str, Any], rows: list[dict[str, Any]],
                  log: Callable[[str], None] = print) -> None:
    url = labels_dir(config, RESULTS)
    table = results_table(rows)
    storage.write_json(url, {"header": header, "rows": rows}, config.storage)
    storage.write_text(labels_dir(config, "results.md"), table, config.storage)
    log(f"\n{table}\nresults: {storage.redact(url)}")
