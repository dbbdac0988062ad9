"""Distribution matching and BiLP's causal-effect pruning, on tensors (no Ray, no data files)."""

from __future__ import annotations

import torch

from engine.data.augment import DSA
from engine.distill.base import MethodSetup, TrainData
from engine.distill.dm import Config, DistributionMatching, causal_effects
from engine.distill.loop import Distiller
from engine.distill.matching import segment_seed
from engine.distill.real import TensorClassBatches
from engine.models import ModelSpec, build_model
from engine.optim import build_seeded
from engine.select.bilp import CausalPruner

SPEC = ModelSpec.create("convnet", channels=1, num_classes=3, image_size=8, width=8, depth=1)


def toy_data(per_class: int = 12, seed: int = 0) -> TrainData:
    """Three classes of 8x8 images: blobs at different places, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        base = torch.zeros(1, 8, 8)
        base[:, 2 * c:2 * c + 3, 1:7] = 2.0
        images.append(base + 0.3 * torch.randn((per_class, 1, 8, 8), generator=generator))
        labels += [c] * per_class
    return TrainData(torch.cat(images), torch.tensor(labels), ["a", "b", "c"],
                     keys=[f"train-{i:08d}" for i in range(3 * per_class)])


def method(**config) -> DistributionMatching:
    model = build_model(SPEC)
    setup = MethodSetup(model, [n for n, _ in model.named_parameters()], torch.device("cpu"),
                        fresh_model=lambda seed: build_seeded(lambda: build_model(SPEC), seed))
    return DistributionMatching(Config(**{"ipc": 2, "batch_real": 8, **config}), setup)


def test_dm_loss_decreases_on_a_toy(tmp_path):
    dm = method(init="noise", lr_img=1.0, iterations=60, dsa=False)
    synthetic = dm.init(toy_data(), torch.Generator().manual_seed(0))
    distiller = Distiller(dm.config, synthetic, dm, str(tmp_path / "out"))
    distiller.run(progress=False)
    first, last = sum(distiller.losses[:10]) / 10, sum(distiller.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert synthetic.alphas.numel() == 0 and "alphas" not in synthetic.learnable()


def naive_dm_loss(net, data: TrainData, images: torch.Tensor, ipc: int, batches: dict[int, torch.Tensor],
                  dsa: DSA | None, draws: dict) -> torch.Tensor:
    """DM's loss as its paper writes it: one graph through every class, real and synthetic alike."""
    loss = torch.zeros(())
    for c, real in batches.items():
        syn = images[c * ipc:(c + 1) * ipc]
        if dsa is not None:
            real, syn = dsa.apply(real, draws[c].first(len(real))), dsa.apply(syn, draws[c].first(len(syn)))
        loss = loss + ((net.features(real).mean(0) - net.features(syn).mean(0)) ** 2).sum()
    return loss


def test_dm_gradient_equals_autograd_through_a_naive_implementation():
    dm = method(dsa=True)
    data = toy_data()
    synthetic = dm.init(data, torch.Generator().manual_seed(1))
    synthetic.images.requires_grad_(True)
    gradients = dm.gradients(synthetic, iteration=3)

    # Replay the same real batches, network and DSA draws, then differentiate the naive loss.
    replay = TensorClassBatches(data.images, data.labels, 8, dm.real[0, 1].seed, data.keys)  # same draws
    batches = {c: replay.batch(c)[0] for c in range(3)}
    draws = {}
    for c, real in batches.items():
        generator = torch.Generator().manual_seed(segment_seed(dm.config.seed, 3, c + 1))
        draws[c] = dm.dsa.sample((max(len(real), 2), *synthetic.images.shape[1:]), generator)
    loss = naive_dm_loss(dm.embedding(3), data, synthetic.images, 2, batches, dm.dsa, draws)
    (expected,) = torch.autograd.grad(loss, synthetic.images)
    torch.testing.assert_close(gradients.grad_sums["images"], expected, rtol=1e-5, atol=1e-6)
    assert abs(float(gradients.loss_sum) - loss.item()) < 1e-5 * max(1.0, loss.item())


def test_causal_effect_closed_form_equals_explicit_leave_one_out():
    torch.manual_seed(0)
    net = build_seeded(lambda: build_model(SPEC), 5).double()
    for p in net.parameters():
        p.requires_grad_(False)
    real = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    syn = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    dsa = DSA("scale_rotate_crop")
    draw = dsa.sample((6, 1, 8, 8), torch.Generator().manual_seed(2))
    real_features = net.features(dsa.apply(real, draw.first(6)))

    def meta_gradient(features: torch.Tensor) -> torch.Tensor:
        s = syn.clone().requires_grad_(True)
        loss = ((features.mean(0) - net.features(dsa.apply(s, draw.first(2))).mean(0)) ** 2).sum()
        return torch.autograd.grad(loss, s)[0]

    with_all = meta_gradient(real_features)
    explicit = torch.stack([meta_gradient(torch.cat([real_features[:i], real_features[i + 1:]])) - with_all
                            for i in range(6)])
    closed = causal_effects(net.features, real_features, syn, dsa, draw)
    torch.testing.assert_close(closed, explicit, rtol=1e-5, atol=1e-10)


def test_the_pruner_keeps_the_middle_band_and_skips_dropped_samples():
    pruner = CausalPruner(beta=0.5, refresh=2)
    norms = torch.tensor([0.0, 1.0, 1.1, 0.9, 1.05, 0.95, 5.0, 1.02])
    keys = [f"k{i}" for i in range(8)]
    keep = pruner.judge(0, norms, keys)
    assert not keep[0] and not keep[6] and keep[1:6].all()
    assert {"k0", "k6"} <= pruner.dropped
    assert pruner.unjudged([*keys[:3], "new"]) == [3]  # a sample is judged once
    assert pruner.due(4) and not pruner.due(5)
    data = toy_data(per_class=4)
    sampler = TensorClassBatches(data.images, data.labels, 8, 0, data.keys, skip={data.keys[0], data.keys[1]})
    _, chosen = sampler.batch(0)
    assert sorted(chosen) == sorted(data.keys[2:4])


def test_causal_pruning_drops_real_samples_during_distillation(tmp_path):
    dm = method(iterations=6, checkpoint_every=3, causal={"beta": 0.6, "refresh": 2})
    data = toy_data()
    synthetic = dm.init(data, torch.Generator().manual_seed(0))
    distiller = Distiller(dm.config, synthetic, dm, str(tmp_path / "out"))
    distiller.run(progress=False)
    summary = dm.pruner.summary(len(data.labels))
    assert summary["dropped"] > 0 and summary["kept"] + summary["dropped"] == 36
    assert summary["judged"] >= 24  # the first refresh judges a batch of 8 in each class
    # resumption restores the dropped samples
    again = method(iterations=6, checkpoint_every=3, causal={"beta": 0.6, "refresh": 2})
    resumed = Distiller(again.config, again.init(data, torch.Generator().manual_seed(0)), again, str(tmp_path / "out"))
    resumed.resume()
    assert again.pruner.dropped == dm.pruner.dropped
