"""Label-space lightening: views, the soft-label store, RDED patches, the HeLlO projector and the student loop."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import DataError
from engine.labels.hello import (
    ProjectorConfig,
    adapter_state,
    build_projector,
    class_prompts,
    fit_projector,
    load_adapter_state,
)
from engine.labels.rded import RdedConfig, lowest_loss_patches, rded_class, stitch
from engine.labels.store import ReplayedViews, SoftLabelStore
from engine.labels.student import DrawnViews, StudentConfig, train_student
from engine.labels.views import ViewsConfig, crop_and_flip, draw_epoch, hard_targets, mix_weight, render
from engine.models.clip import TextTower
from engine.models.registry import ModelSpec, build_model
from engine.optim import build_seeded


def small_classifier(classes: int = 3) -> nn.Module:
    return build_seeded(lambda: build_model(ModelSpec.create("convnet", channels=3, num_classes=classes, image_size=8,
                                                             width=4, depth=2)), 0)


def small_dual_encoder() -> nn.Module:
    tower = {"arch": "convnet", "kwargs": {"channels": 3, "num_classes": 0, "image_size": 8, "width": 4, "depth": 2}}
    return build_seeded(lambda: build_model(ModelSpec.create("clip", image_tower=tower, embed_dim=16, head="linear")), 0)


def test_a_full_box_without_flip_is_the_image_and_a_flip_mirrors_it():
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert torch.allclose(crop_and_flip(images, full, torch.zeros(2, dtype=torch.uint8)), images, atol=1e-5)
    assert torch.allclose(crop_and_flip(images, full, torch.ones(2, dtype=torch.uint8)), images.flip(-1), atol=1e-5)


def test_cutmix_pastes_the_partner_and_mixes_the_hard_labels_by_area():
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    views = draw_epoch(6, 3, 8, ViewsConfig(cutmix=1.0), torch.Generator().manual_seed(2))
    for b, _ in views.batches():
        x = render(images, views, b)
        y0, y1, x0, x1 = views.cuts[b].tolist()
        rows = views.slots(b)
        own = crop_and_flip(images[views.order[rows]], views.boxes[rows], views.flips[rows])
        partner = views.partners[rows] - rows.start
        assert torch.equal(x[:, :, y0:y1, x0:x1], own[partner][:, :, y0:y1, x0:x1])
        assert mix_weight(views, b, 8) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64)
        labels = torch.arange(6) * 10
        mine, theirs = hard_targets(labels, views, b)
        assert torch.equal(mine, labels[views.order[rows]])
        assert torch.equal(theirs, labels[views.order[views.partners[rows]]])


def test_the_soft_label_store_round_trips_views_and_logits_and_counts_its_bytes(tmp_path):
    teacher = small_classifier()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    config = StudentConfig(epochs=3, batch_size=4)
    drawn = DrawnViews(len(images), 8, config, seed=5)
    fingerprint = {"images": "i", "teacher": "t", "views": "v"}
    store = SoftLabelStore.open(str(tmp_path / "store"), fingerprint, 3, 4, 3)
    written = {}

    def label(views, b):
        logits = teacher(render(images, views, b)).detach()
        written.setdefault(views.order[0].item(), []).append(logits)
        return logits

    store.fill(drawn.views, label)
    files = sorted(p for p in os.listdir(tmp_path / "store") if p.endswith(".safetensors"))
    assert store.bytes == sum(os.path.getsize(tmp_path / "store" / f) for f in files) and len(files) == 3
    assert store.logit_bytes(6) == 3 * 6 * 3 * 2
    reopened = SoftLabelStore.open(str(tmp_path / "store"), fingerprint, 3, 4, 3)
    assert reopened.complete and reopened.bytes == store.bytes
    for epoch in range(3):
        views, logits = reopened.read(epoch)
        fresh = drawn.views(epoch)
        for name in views.FIELDS:
            assert torch.equal(getattr(views, name), getattr(fresh, name)), name
        expected = torch.cat([teacher(render(images, fresh, b)).detach() for b, _ in fresh.batches()])
        assert torch.equal(logits, expected.half().float())  # exactly the stored float16 values
    with pytest.raises(DataError, match="labels.json: a soft-label store of other teacher"):
        SoftLabelStore.open(str(tmp_path / "store"), {**fingerprint, "teacher": "other"}, 3, 4, 3)


def test_a_store_interrupted_after_an_epoch_writes_only_the_rest(tmp_path):
    teacher = small_classifier()
    images = torch.randn(4, 3, 8, 8)
    drawn = DrawnViews(4, 8, StudentConfig(epochs=3, batch_size=4), seed=0)
    fingerprint = {"images": "i", "teacher": "t", "views": "v"}
    calls = []

    def label(views, b):
        calls.append(views.order.tolist())
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies while labelling epoch 1
        return teacher(render(images, views, b)).detach()

    with pytest.raises(KeyboardInterrupt):
        SoftLabelStore.open(str(tmp_path), fingerprint, 3, 4, 3).fill(drawn.views, label)
    store = SoftLabelStore.open(str(tmp_path), fingerprint, 3, 4, 3)
    assert list(store.files) == ["epoch-0000.safetensors"]
    calls.clear()
    store.fill(drawn.views, lambda views, b: teacher(render(images, views, b)).detach())
    assert store.complete and len(store.files) == 3


def test_replaying_the_store_trains_the_student_the_teacher_would_have_trained_online(tmp_path):
    teacher = small_classifier()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = StudentConfig(epochs=4, batch_size=3, lr=0.05)
    store = SoftLabelStore.open(str(tmp_path), {"images": "i", "teacher": "t", "views": "v"}, 4, 3, 3)
    store.fill(DrawnViews(6, 8, config, seed=1).views,
               lambda views, b: teacher(render(images, views, b)).detach().half().float())
    replayed = train_student(small_classifier(), images, labels, ReplayedViews(store), config, seed=9)
    online = train_student(small_classifier(), images, labels,
                           DrawnViews(6, 8, config, seed=1, label=lambda x: teacher(x).half().float()), config, seed=9)
    hard = train_student(small_classifier(), images, labels, DrawnViews(6, 8, config, seed=1), config, seed=9)
    for a, b in zip(replayed.parameters(), online.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, c) for a, c in zip(replayed.parameters(), hard.parameters(), strict=True))


def test_rded_keeps_each_images_best_patch_and_the_lowest_loss_images():
    losses = torch.tensor([[3.0, 0.5, 2.0], [0.1, 4.0, 4.0], [1.0, 1.0, 0.9], [5.0, 6.0, 7.0]])
    images, crops = lowest_loss_patches(losses, 2)
    assert images.tolist() == [1, 0] and crops.tolist() == [0, 1]
    patches = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 4, 4)
    stitched = stitch(patches, 2)
    assert stitched.shape == (1, 1, 4, 4)
    assert stitched[0, 0, :2, :2].unique().tolist() == [0.0] and stitched[0, 0, 2:, 2:].unique().tolist() == [3.0]


def test_rded_picks_the_patches_the_teacher_finds_most_typical():
    """A teacher that scores class 0 by the mean brightness: the stitched image comes from the brightest
    real images."""

    class Brightness(nn.Module):
        def forward(self, x):
            score = x.mean((1, 2, 3)) * 10
            return torch.stack([score, -score], 1)

    images = torch.stack([torch.full((3, 8, 8), v) for v in [0.0, 0.9, 0.1, 0.8, 0.2, 1.0, 0.7, 0.3]])
    stitched = rded_class(images, 0, Brightness(), 1, RdedConfig(factor=2, crops=2, scale_min=1.0),
                          torch.Generator().manual_seed(0))
    assert sorted(stitched[0, 0, ::4, ::4].flatten().tolist()) == pytest.approx([0.7, 0.8, 0.9, 1.0])
    with pytest.raises(DataError, match="class 0 has 3 real images"):
        rded_class(images[:3], 0, Brightness(), 1, RdedConfig(factor=2), torch.Generator())


def test_the_projector_starts_as_cosine_zero_shot_classification():
    encoder = small_dual_encoder()
    names = ["airplane", "automobile", "bird"]
    features = TextTower.from_pretrained().embed_captions(class_prompts(names, "a photo of a {}"))
    with torch.no_grad():
        class_text = encoder.encode_text_features(features)
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cosine = F.normalize(encoder.encode_image(images), dim=-1) @ F.normalize(class_text, dim=-1).T
    projector = build_projector(encoder, class_text, 0.07, ProjectorConfig(tower_rank=2, head_rank=3))
    with torch.no_grad():
        logits = projector(images)
    assert torch.allclose(logits, cosine / 0.07, atol=1e-5)
    assert torch.equal(logits.argmax(1), cosine.argmax(1))


def test_only_the_adapters_and_the_head_update_train_and_are_stored(tmp_path):
    encoder = small_dual_encoder()
    projector = build_projector(encoder, torch.randn(3, 16), 0.07, ProjectorConfig(tower_rank=2, head_rank=3))
    trainable = {name for name, p in projector.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(projector))
    assert {"head_down", "head_up"} <= trainable
    assert all(".lora_" in n for n in trainable - {"head_down", "head_up"}) and len(trainable) > 2
    before = {name: p.detach().clone() for name, p in projector.named_parameters()}
    teacher = small_classifier()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    fit_projector(projector, lambda epoch: iter(data), [teacher], ProjectorConfig(epochs=2, lr=1e-2), lambda x: x,
                  log=lambda _: None)
    changed = {name for name, p in projector.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    fresh = build_projector(small_dual_encoder(), torch.randn(3, 16), 0.07, ProjectorConfig(tower_rank=2, head_rank=3))
    stored = adapter_state(projector, torch.float16)
    assert all(t.dtype == torch.float16 for t in stored.values())
    load_adapter_state(fresh, stored, "adapters.safetensors")
    loaded = dict(fresh.named_parameters())
    assert all(torch.equal(loaded[name], value.float()) for name, value in stored.items())
    wrong = build_projector(small_dual_encoder(), torch.randn(4, 16), 0.07, ProjectorConfig(tower_rank=2, head_rank=3))
    with pytest.raises(ValueError, match=r"adapters.safetensors: head_down is \(3, 3\)"):
        load_adapter_state(wrong, adapter_state(projector), "adapters.safetensors")
