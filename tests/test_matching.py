"""The trajectory-matching gradient: exact (constant memory) equals unrolled autograd; the outer loop."""

from __future__ import annotations

import pytest
import torch

from engine.distill.base import MethodSetup, init_synthetic
from engine.distill.matching import group_distance, match_trajectory
from engine.distill.mtt import MTT, soft_labels_from_expert
from engine.distill.mtt import Config as DistillConfig
from engine.models import ModelSpec, build_model, get_flat, select_parameters
from engine.models.functional import FunctionalModel
from engine.optim import build_seeded


def small_convnet(num_classes: int = 4) -> torch.nn.Module:
    spec = ModelSpec.create("convnet", channels=2, num_classes=num_classes, image_size=8, width=6, depth=2)
    return build_seeded(lambda: build_model(spec), 0).double()


def problem_setup(labels: str, batch_syn: int | None, dsa: bool = True):
    torch.manual_seed(0)
    model = small_convnet()
    names = select_parameters(model, "all")
    config = DistillConfig(ipc=2, syn_steps=4, labels=labels, batch_syn=batch_syn, dsa=dsa, max_start_epoch=2)
    real = torch.randn(40, 2, 8, 8, dtype=torch.float64)
    real_labels = torch.arange(4).repeat(10)
    gen = torch.Generator().manual_seed(1)
    synthetic = init_synthetic(real, real_labels, 4, config.ipc, config.init, gen, step_size=0.05)
    method = MTT(config, MethodSetup(model, names, torch.device("cpu")))
    start = get_flat(model, names)
    target = start + 0.05 * torch.randn(start.shape, dtype=torch.float64)
    if labels == "soft":
        synthetic.labels = soft_labels_from_expert(synthetic, method.student, target)
    for tensor in synthetic.learnable().values():
        tensor.requires_grad_(True)
    return config, synthetic, method, start, target


@pytest.mark.parametrize(("labels", "batch_syn", "stride"), [("hard", None, 1), ("soft", 3, None), ("hard", 2, 3)])
def test_exact_equals_unrolled_with_augmentation(labels, batch_syn, stride):
    config, synthetic, method, start, target = problem_setup(labels, batch_syn)
    leaves = [t for name, t in synthetic.learnable().items() if name != "alphas"]
    results = {}
    for mode in ("unrolled", "exact"):
        problem = method.problem(synthetic, torch.Generator().manual_seed(7))  # same batches and draws
        results[mode] = match_trajectory(problem, start, target, synthetic.alphas, method.groups,
                                         config.syn_steps, leaves, mode, stride)
    unrolled, exact = results["unrolled"], results["exact"]
    assert unrolled.loss == pytest.approx(exact.loss, rel=1e-12)
    assert len(exact.leaf_grads) == (2 if labels == "soft" else 1)
    for a, b in zip(unrolled.leaf_grads, exact.leaf_grads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert unrolled.alpha_grad.abs().item() > 0
    torch.testing.assert_close(unrolled.alpha_grad, exact.alpha_grad, rtol=1e-9, atol=1e-12)


def test_gradient_matches_finite_differences_of_the_loss():
    config, synthetic, method, start, target = problem_setup("hard", None, dsa=False)
    problem = method.problem(synthetic, torch.Generator().manual_seed(3))
    result = match_trajectory(problem, start, target, synthetic.alphas, method.groups, config.syn_steps,
                              [synthetic.images], "exact")

    def loss_at(images: torch.Tensor, alphas: torch.Tensor) -> float:
        theta = start.clone()
        for step in range(config.syn_steps):
            problem.images = images
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(problem.step_loss(t, step), t)
            theta = theta - alphas[method.groups] * g
        return group_distance(theta, target, start, method.groups, 1).item()

    eps = 1e-6
    direction = torch.randn_like(synthetic.images)
    images = synthetic.images.detach()
    plus = loss_at(images + eps * direction, synthetic.alphas.detach())
    minus = loss_at(images - eps * direction, synthetic.alphas.detach())
    assert (plus - minus) / (2 * eps) == pytest.approx((result.leaf_grads[0] * direction).sum().item(), rel=1e-5)
    plus = loss_at(images, synthetic.alphas.detach() + eps)
    minus = loss_at(images, synthetic.alphas.detach() - eps)
    assert (plus - minus) / (2 * eps) == pytest.approx(result.alpha_grad.item(), rel=1e-5)


def test_group_distance_sums_normalised_groups():
    theta, target, start = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), torch.tensor([2.0, 2.0, 1.0])
    groups = torch.tensor([0, 0, 1])
    assert group_distance(theta, target, start, groups, 2).item() == pytest.approx(5 / 8 + 9 / 1)


def test_functional_model_equals_the_module():
    model = small_convnet()
    names = select_parameters(model, "all")
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    student = FunctionalModel(model, names)
    torch.testing.assert_close(student(get_flat(model, names), x), model(x))
