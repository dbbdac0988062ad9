"""Vision-language distillation: the contrastive inner loop's two gradient modes agree, pairs are
initialised from real pairs, text vectors decode to their nearest captions."""

from __future__ import annotations

import pytest
import torch

from engine.distill.base import MethodSetup
from engine.distill.matching import match_trajectory
from engine.distill.vl import IMAGE, TEXT, VisionLanguage, init_pairs, learned_lr, nearest_captions
from engine.distill.vl import Config as DistillConfig
from engine.errors import DataError
from engine.models import (
    LoraSpec,
    ModelSpec,
    build_model,
    full_matching_size,
    get_flat,
    parameter_groups,
    select_parameters,
)
from engine.optim import build_seeded
from engine.stages.evaluate import Pool, one_caption_per_image


def dual_encoder(dropout: float = 0.0) -> ModelSpec:
    tower = {"arch": "convnet", "kwargs": {"channels": 3, "num_classes": 0, "image_size": 8, "width": 4, "depth": 2}}
    return ModelSpec.create("clip", image_tower=tower, embed_dim=8, head="linear",
                            lora=LoraSpec(target_modules=["conv"], rank=2, alpha=4, dropout=dropout))


@pytest.fixture(scope="module")
def dual_encoder_spec() -> ModelSpec:
    return dual_encoder()


@pytest.mark.parametrize(("record", "dropout"), [("heads", 0.0), ("lora+heads", 0.0), ("lora+heads", 0.3)])
def test_contrastive_exact_gradient_equals_unrolled(record, dropout):
    """With LoRA dropout too: the backward pass replays each step's dropout masks."""
    model = build_seeded(lambda: build_model(dual_encoder(dropout)), 0).double()
    names = select_parameters(model, record)
    config = DistillConfig(ipc=6, syn_steps=3, batch_syn=4, dsa=True, max_start_epoch=2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 8, 8, generator=gen, dtype=torch.float64)
    features = torch.randn(20, model.text_dim, generator=gen, dtype=torch.float64)
    caption_image = torch.arange(10).repeat_interleave(2)
    synthetic = init_pairs(images, features, caption_image, 6, config, 0.1, gen)
    synthetic.alphas = torch.tensor([0.1, 0.3], dtype=torch.float64)  # a step size per side
    for tensor in synthetic.learnable().values():
        tensor.requires_grad_(True)
    method = VisionLanguage(config, MethodSetup(model, names, torch.device("cpu"), temperature=0.07))
    assert set(method.groups.tolist()) == {IMAGE, TEXT}
    start = get_flat(model, names) + 0.1 * torch.randn(len(get_flat(model, names)), generator=gen,
                                                       dtype=torch.float64)  # adapters away from B = 0
    target = start + 0.05 * torch.randn(start.shape, generator=gen, dtype=torch.float64)
    results = {}
    for mode in ("unrolled", "exact"):
        problem = method.problem(synthetic, torch.Generator().manual_seed(5))
        results[mode] = match_trajectory(problem, start, target, synthetic.alphas, method.groups, config.syn_steps,
                                         [synthetic.images, synthetic.text], mode, stride=2)
    unrolled, exact = results["unrolled"], results["exact"]
    assert unrolled.loss == pytest.approx(exact.loss, rel=1e-12)
    for a, b in zip(unrolled.leaf_grads, exact.leaf_grads, strict=True):  # images, then text vectors
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert (unrolled.alpha_grad != 0).all()
    torch.testing.assert_close(unrolled.alpha_grad, exact.alpha_grad, rtol=1e-9, atol=1e-12)


def test_lora_matching_records_the_adapters_and_heads_not_the_tower(dual_encoder_spec):
    model = build_model(dual_encoder_spec)
    params, groups = dict(model.named_parameters()), parameter_groups(model)
    size = {group: sum(params[n].numel() for n in names) for group, names in groups.items()}
    assert set(size) == {"image_encoder", "lora", "image_head", "text_head"}
    assert full_matching_size(model) == size["image_encoder"] + size["image_head"] + size["text_head"]
    lora_matched = select_parameters(model, "lora+heads")
    assert sum(params[n].numel() for n in lora_matched) == size["lora"] + size["image_head"] + size["text_head"]
    assert not set(lora_matched) & set(groups["image_encoder"])
    assert size["lora"] < size["image_encoder"]


def test_pairs_start_from_real_pairs_and_distinct_images():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 4, 4, generator=gen)
    features = torch.randn(24, 5, generator=gen)
    caption_image = torch.arange(8).repeat_interleave(3)
    synthetic = init_pairs(images, features, caption_image, 5, DistillConfig(), 0.1, gen)
    chosen, captions = synthetic.metadata["init_images"], synthetic.metadata["init_captions"]
    assert len(set(chosen)) == 5
    for i, (image, caption) in enumerate(zip(chosen, captions, strict=True)):
        assert caption_image[caption] == image  # each text vector is one of its image's own captions
        assert torch.equal(synthetic.images[i], images[image]) and torch.equal(synthetic.text[i], features[caption])
    assert synthetic.alphas.tolist() == pytest.approx([0.1, 0.1])


def test_one_pair_or_more_pairs_than_images_is_a_clear_error():
    gen = torch.Generator().manual_seed(1)
    images, features, caption_image = torch.randn(4, 3, 4, 4), torch.randn(8, 5), torch.arange(4).repeat_interleave(2)
    with pytest.raises(DataError, match=r"distill.ipc=1: .* at least 2 pairs"):
        init_pairs(images, features, caption_image, 1, DistillConfig(), 0.1, gen)
    with pytest.raises(DataError, match="5 synthetic pairs asked for, but the training split has 4 images"):
        init_pairs(images, features, caption_image, 5, DistillConfig(), 0.1, gen)


def test_text_vectors_decode_to_their_nearest_caption():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    captions = ["a dog", "a cat", "a dog and a cat"]
    text = torch.tensor([[0.1, 2.0], [3.0, 0.2], [1.0, 1.1]])
    decoded = nearest_captions(text, features, captions)
    assert [c for c, _ in decoded] == ["a cat", "a dog", "a dog and a cat"]
    assert all(0.9 < s <= 1.0 + 1e-6 for _, s in decoded)


def test_learned_step_sizes_apply_per_side():
    lr = learned_lr(torch.tensor([0.5, 0.25]))
    assert lr("image_encoder.blocks.0.conv.lora_A.default.weight") == 0.5
    assert lr("image_head.proj.weight") == 0.5
    assert lr("text_head.proj.weight") == 0.25


def test_pair_coresets_take_one_caption_each_of_distinct_images():
    caption_image = torch.arange(12).repeat_interleave(5)[torch.randperm(60, generator=torch.Generator().manual_seed(1))]
    picked = one_caption_per_image(caption_image, 12, torch.Generator().manual_seed(0))
    assert sorted(caption_image[picked].tolist()) == list(range(12))  # every image once, one caption each

    images = torch.arange(12.0).view(12, 1, 1, 1)  # image i is the value i: the chosen pairs show their images
    pool = Pool(torch.zeros(60, 3), None, lambda generator: one_caption_per_image(caption_image, 12, generator),
                lambda: torch.zeros(60, 2), lambda: torch.zeros(60), lambda units: images[caption_image[units]], 60)
    for size in (5, 12):
        chosen, text = pool.coreset("random", size, seed=0)
        assert len(set(chosen.flatten().tolist())) == size == len(chosen) == len(text)
    with pytest.raises(DataError, match="a coreset of 13 pairs needs 13 training images; the split has 12"):
        pool.coreset("random", 13, seed=0)
