"""Fidelity: evaluation networks never start where an expert started; the student runs in the experts'
mode (a frozen batch-norm tower keeps its statistics); DATM's soft labels. (Dropout replayed by the exact
gradient: tests/test_vl.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.distill.base import MethodSetup
from engine.distill.mtt import MTT, datm_init
from engine.distill.mtt import Config as DistillConfig
from engine.distill.vl import Config as VLConfig
from engine.distill.vl import VisionLanguage, init_pairs
from engine.errors import ConfigError
from engine.evaluate.run import EvaluatedSet, evaluate_sets
from engine.evaluate.tasks import ClassificationTask
from engine.evaluate.train import TrainConfig
from engine.labels import StoredLabels
from engine.models import ModelSpec, build_model, get_flat, select_parameters
from engine.models.params import train_mode
from engine.optim import build_seeded
from engine.seeds import MAX_BASE_SEED, MAX_INDEX, STREAMS, evaluation_seeds, expert_seed, stream_seed
from engine.trajectories.experts import ExpertPlan, build_expert_model
from engine.trajectories.train import ExpertConfig, ExpertData, objective_loss


def tiny_convnet_spec() -> ModelSpec:
    return ModelSpec.create("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=1)


def test_evaluation_networks_never_start_where_an_expert_started():
    spec = tiny_convnet_spec()
    plan = ExpertPlan(store_url="unused", spec=spec, record="all", train=ExpertConfig(epochs=1), fingerprint="f",
                      data=ExpertData(torch.zeros(3, 1, 8, 8), torch.arange(3)), seed=0)
    expert_starts = [get_flat(*build_expert_model(plan, plan.expert_seed(i))) for i in range(5)]
    started_from: list[torch.Tensor] = []

    def build() -> torch.nn.Module:  # the evaluation loop builds each fresh network through this
        model = build_model(spec)
        started_from.append(get_flat(model, select_parameters(model, "all")))
        return model

    images, labels = torch.rand(6, 1, 8, 8), torch.arange(3).repeat(2)
    task = ClassificationTask(build, images, labels, StoredLabels())
    (row,) = evaluate_sets(task, [EvaluatedSet("random", 2, images, labels, 0.01, 1)],
                           TrainConfig(epochs=1, dsa=False), evaluation_seeds(0, 5), log=lambda _: None)
    assert len(started_from) == 5 and row["seeds"] == evaluation_seeds(0, 5)
    for evaluation_start, expert_start in itertools.product(started_from, expert_starts):
        assert not torch.equal(evaluation_start, expert_start)


def test_seed_streams_are_disjoint_in_the_32_bits_torch_keeps():
    ranges = sorted((stream_seed(s, 0, 0), stream_seed(s, MAX_BASE_SEED - 1, MAX_INDEX - 1)) for s in STREAMS)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # no overlap anywhere
    assert ranges[-1][1] < 2**32  # torch's CPU generator keeps only the low 32 bits
    seeds = {stream_seed(s, b, i) for s in STREAMS for b in (0, 1, MAX_BASE_SEED - 1) for i in (0, 1, MAX_INDEX - 1)}
    assert len(seeds) == len(STREAMS) * 9  # injective
    assert expert_seed(0, 3) == 3  # stores written with base seed 0 keep their experts' seeds
    with pytest.raises(ConfigError, match="experts.seed"):
        expert_seed(MAX_BASE_SEED, 0)
    with pytest.raises(ConfigError, match="index"):
        evaluation_seeds(0, MAX_INDEX + 1)


def batchnorm_dual_encoder() -> tuple[torch.nn.Module, list[str]]:
    tower = {"arch": "convnet", "kwargs": {"channels": 3, "num_classes": 0, "image_size": 8, "width": 4,
                                           "depth": 1, "norm": "batch"}}
    spec = ModelSpec.create("clip", image_tower=tower, embed_dim=8, head="linear", freeze_image_encoder=True)
    model = build_seeded(lambda: build_model(spec), 0).double()
    with torch.no_grad():  # running statistics far from any batch's: a mode mix-up cannot go unnoticed
        for module in model.image_encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(0.5)
                module.running_var.fill_(4.0)
    return model, select_parameters(model, "heads")


def test_a_frozen_batchnorm_tower_runs_as_in_the_experts_during_distillation():
    model, names = batchnorm_dual_encoder()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64)
    features = torch.randn(6, model.text_dim, generator=gen, dtype=torch.float64)
    config = VLConfig(ipc=6, syn_steps=1, dsa=False, max_start_epoch=2)
    synthetic = init_pairs(images, features, torch.arange(6), 6, config, 0.1, gen)
    method = VisionLanguage(config, MethodSetup(model, names, torch.device("cpu"), temperature=0.07))
    theta = get_flat(model, names)
    student_loss = method.problem(synthetic, torch.Generator().manual_seed(1)).step_loss(theta, 0)

    expert, _ = batchnorm_dual_encoder()  # the expert trains in train_mode, as train_epoch puts it
    train_mode(expert, names)
    expert_loss = objective_loss(expert, synthetic.images, synthetic.text, ExpertConfig(objective="contrastive"))
    assert student_loss.item() == pytest.approx(expert_loss.item(), rel=1e-12)
    assert not model.image_encoder.training and model.image_head.training


def test_train_mode_puts_only_fully_frozen_modules_in_eval():
    model, names = batchnorm_dual_encoder()
    train_mode(model, names)
    assert model.training and model.image_head.training and model.text_head.training
    assert not any(m.training for m in model.image_encoder.modules())
    train_mode(model, select_parameters(model, "all"))
    assert all(m.training for m in model.image_encoder.modules())


def test_datm_init_takes_correctly_classified_images_and_averages_the_correct_experts():
    spec = ModelSpec.create("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=1)
    model = build_seeded(lambda: build_model(spec), 0).double()
    names = select_parameters(model, "all")
    student = MTT(DistillConfig(max_start_epoch=2), MethodSetup(model, names, torch.device("cpu"))).student

    def expert_predicting(c: int) -> torch.Tensor:  # a zero classifier with a bias: every image -> class c
        theta = get_flat(model, names)
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
        theta[-head:] = 0.0
        theta[-3 + c] = 5.0
        return theta

    images = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(3).repeat(4)
    config = DistillConfig(ipc=2, labels="soft", max_start_epoch=2)
    finals = [expert_predicting(0), expert_predicting(1)]
    synthetic = datm_init(images, labels, 3, config, 0.01, torch.Generator().manual_seed(0), student, finals)
    assert synthetic.images.shape == (6, 1, 8, 8) and synthetic.labels.shape == (6, 3)
    chosen = [int((images == x).flatten(1).all(1).nonzero()) for x in synthetic.images]
    assert [int(labels[i]) for i in chosen] == [0, 0, 1, 1, 2, 2]
    expected = {0: logits(student, finals[0]), 1: logits(student, finals[1])}
    torch.testing.assert_close(synthetic.labels[:2], expected[0].expand(2, 3))  # only expert 0 is right
    torch.testing.assert_close(synthetic.labels[2:4], expected[1].expand(2, 3))  # only expert 1 is right
    torch.testing.assert_close(synthetic.labels[4:], ((expected[0] + expected[1]) / 2).expand(2, 3))  # nobody


def logits(student, theta: torch.Tensor) -> torch.Tensor:
    return student(theta, torch.zeros(1, 1, 8, 8, dtype=torch.float64))[0].detach()
