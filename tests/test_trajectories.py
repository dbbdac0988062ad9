"""Expert training and the sharded trajectory store, on sklearn digits, locally and on S3 (moto)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import storage
from engine.errors import DataError
from engine.losses import infonce_loss
from engine.models import ModelSpec, build_model, select_parameters
from engine.optim import build_seeded
from engine.trajectories import (
    ExpertConfig,
    ExpertData,
    LeaseLost,
    StoreMismatch,
    StoreWriter,
    TrainState,
    TrajectoryStore,
    record_expert,
    train_expert,
)

EPOCHS = 3
CONFIG = ExpertConfig(epochs=EPOCHS, batch_size=128, lr=0.05, momentum=0.5, weight_decay=5e-4)


def digits_spec(width: int = 8, norm: str = "instance") -> ModelSpec:
    """ConvNet-D for 8 px digits: 2 x [conv 3x3 -> norm -> ReLU -> avg pool] -> linear."""
    return ModelSpec.create(
        "convnet", channels=1, num_classes=10, image_size=8, width=width, depth=2, norm=norm
    )


def new_model(seed: int, spec: ModelSpec | None = None) -> nn.Module:
    spec = spec or digits_spec()
    return build_seeded(lambda: build_model(spec), seed)


def recorded_names(model: nn.Module) -> list[str]:
    return select_parameters(model, "all")


def spec_params(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return dict(build_model(spec).named_parameters())


@pytest.fixture(scope="module")
def digits() -> tuple[ExpertData, ExpertData]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return ExpertData(images[:1500], labels[:1500]), ExpertData(images[1500:], labels[1500:])


def one_epoch(data: ExpertData, seed: int) -> TrainState:
    model = new_model(seed=0)
    return train_expert(
        model, data, CONFIG.model_copy(update={"epochs": 1}), recorded=recorded_names(model), seed=seed
    )


def accuracy_on(val: ExpertData):
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"val_accuracy": (model(val.images).argmax(1) == val.targets).float().mean().item()}

    return evaluate


def open_store(url: str, storage_config=None, owner: str | None = None, spec: ModelSpec | None = None):
    spec = spec or digits_spec()
    return StoreWriter.create_or_open(
        url, spec.model_dump(mode="json"), spec_params(spec), "digits-1500", CONFIG.model_dump(), storage_config,
        owner=owner,
    )  # fmt: skip


def record(store: TrajectoryStore, expert_id: int, data: ExpertData, val: ExpertData, on_epoch=None):
    model = new_model(seed=expert_id, spec=ModelSpec.model_validate(store.manifest.spec))
    return record_expert(
        store, expert_id, model, data, CONFIG, recorded=recorded_names(model), seed=expert_id,
        eval_fn=accuracy_on(val), on_epoch=on_epoch,
    )  # fmt: skip


# --- losses ---------------------------------------------------------------------------------------


def test_infonce_is_symmetric_and_matches_a_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    tau = 0.5
    sim = [[sum(a * b for a, b in zip(i, t, strict=True)) / tau for t in txt.tolist()] for i in img.tolist()]

    def cross_entropy(rows: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(v) for v in row)) - row[k] for k, row in enumerate(rows)) / len(rows)

    columns = [list(col) for col in zip(*sim, strict=True)]
    expected = (cross_entropy(sim) + cross_entropy(columns)) / 2
    assert infonce_loss(img, txt, tau).item() == pytest.approx(expected, rel=1e-6)
    assert infonce_loss(txt, img, tau).item() == pytest.approx(expected, rel=1e-6)


# --- training -------------------------------------------------------------------------------------


def test_only_recorded_parameters_train_and_runs_are_seeded(digits):
    data, _ = digits
    config = CONFIG.model_copy(update={"epochs": 1})
    snapshots = {}
    for run in ("a", "b"):
        model = new_model(seed=0)
        frozen_before = model.blocks[0].conv.weight.detach().clone()
        state = train_expert(model, data, config, recorded=select_parameters(model, "heads"), seed=7)
        assert torch.equal(model.blocks[0].conv.weight, frozen_before)
        snapshots[run] = state.params
    assert torch.equal(snapshots["a"]["classifier.weight"], snapshots["b"]["classifier.weight"])
    assert set(snapshots["a"]) == {"classifier.weight", "classifier.bias"}


def test_train_state_round_trips_through_safetensors(digits):
    data, _ = digits
    state = one_epoch(data, seed=1)
    again = TrainState.from_bytes(state.to_bytes())
    assert (again.epoch, again.seed, again.metrics) == (state.epoch, state.seed, state.metrics)
    assert torch.equal(again.rng_state, state.rng_state)
    assert all(torch.equal(again.momentum[k], v) for k, v in state.momentum.items())


class PairModel(nn.Module):
    """A tiny dual encoder: image MLP and a linear text head, both L2-normalised."""

    def __init__(self, pixels: int = 16, text_dim: int = 12, dim: int = 16) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 32), nn.ReLU(), nn.Linear(32, dim))
        self.text = nn.Linear(text_dim, dim)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(text_features), dim=1)


def test_contrastive_expert_recall_rises():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 4, 4, generator=gen)
    text = images.flatten(1) @ torch.randn(16, 12, generator=gen) + 0.1 * torch.randn(64, 12, generator=gen)
    pairs = ExpertData(images, text)

    def recall_at_1(model: nn.Module) -> dict[str, float]:
        img, txt = model(pairs.images, pairs.targets)
        return {"recall@1": ((img @ txt.T).argmax(1) == torch.arange(len(img))).float().mean().item()}

    config = ExpertConfig(objective="contrastive", epochs=8, batch_size=16, lr=0.1, dsa=False)
    model = build_seeded(PairModel, 0)
    recall = []
    train_expert(
        model, pairs, config, recorded=[name for name, _ in model.named_parameters()], seed=0, eval_fn=recall_at_1,
        on_epoch=lambda epoch, params, state: recall.append(state.metrics["recall@1"]),
    )  # fmt: skip
    assert len(recall) == 9
    assert recall[-1] > max(recall[0], 2 / 64) + 0.2, recall


# --- the store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_experts_into_a_store_and_read_back_epochs(where, digits, tmp_path, request, monkeypatch):
    data, val = digits
    if where == "s3":
        bucket, storage_config = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/trajectories"
    else:
        url, storage_config = str(tmp_path / "trajectories"), None
    store = open_store(url, storage_config)
    produced: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for expert_id in store.pending(2):
        assert store.claim(expert_id)
        record(
            store,
            expert_id,
            data,
            val,
            lambda e, p, s, i=expert_id: produced.setdefault(i, {}).update({e: p}),
        )

    reader = TrajectoryStore.open(url, storage_config)
    assert reader.experts() == [0, 1] and reader.num_epochs == EPOCHS and store.pending(2) == []
    assert not storage.exists(storage.join(url, "partial", "expert-00000"), storage_config)
    for expert_id in (0, 1):
        status = reader.verify(expert_id)
        assert len(status.metrics) == EPOCHS + 1 and "val_accuracy" in status.metrics[-1]
        assert status.metrics[-1]["val_accuracy"] > 0.5

    fetched = []
    read_range = reader._fs.cat_file

    def counted_read(path, start=None, end=None, **kwargs):
        fetched.append(end - start)
        return read_range(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(reader._fs, "cat_file", counted_read)
    loaded = reader.load_epochs(1, [1, 3])
    monkeypatch.undo()
    assert sorted(loaded) == [1, 3]
    for epoch in (1, 3):
        assert list(loaded[epoch]) == recorded_names(new_model(0))
        assert all(torch.equal(loaded[epoch][n], produced[1][epoch][n]) for n in loaded[epoch])
    epoch_bytes = 4 * sum(p.numel() for p in new_model(0).parameters())
    assert fetched[2:] == [epoch_bytes, epoch_bytes]  # after length and header: one range per epoch
    assert sum(fetched) < reader.status(1).bytes

    only_head = reader.load_epochs(0, [2], names=["classifier.bias"])
    assert torch.equal(only_head[2]["classifier.bias"], produced[0][2]["classifier.bias"])
    streamed = list(reader.iter_experts())
    assert [i for i, _ in streamed] == [0, 1]
    assert sorted(streamed[0][1]) == [0, 1, 2, 3]
    assert not torch.equal(streamed[0][1][0]["classifier.weight"], streamed[0][1][3]["classifier.weight"])


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("norm", ["instance", "batch"])  # batch: running statistics are resumed too
def test_resume_after_interruption_is_bit_identical_and_skips_done_epochs(norm, digits, tmp_path):
    data, val = digits
    reference = open_store(str(tmp_path / "reference"), spec=digits_spec(norm=norm))
    reference_status = record(reference, 0, data, val)

    store = open_store(str(tmp_path / "interrupted"), spec=digits_spec(norm=norm))

    def crash_after_epoch_2(epoch, params, state):
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        record(store, 0, data, val, crash_after_epoch_2)
    assert store.experts() == []
    state, saved = store.resume_state(0)
    assert state is not None and state.epoch == 2 and saved == [0, 1, 2]

    trained_epochs = []
    status = record(store, 0, data, val, lambda epoch, params, state: trained_epochs.append(epoch))
    assert trained_epochs == [3]
    assert status.sha256 == reference_status.sha256  # the whole shard is byte-identical
    final, expected = store.load_epochs(0, [EPOCHS])[EPOCHS], reference.load_epochs(0, [EPOCHS])[EPOCHS]
    assert all(torch.equal(final[n], expected[n]) for n in expected)


def test_a_partial_expert_is_never_listed(digits, tmp_path):
    data, _ = digits
    store = open_store(str(tmp_path / "s"))
    state = one_epoch(data, seed=0)
    store.write_epoch(0, 0, state.params, state)
    assert store.experts() == []
    assert TrajectoryStore.open(store.url).experts() == []
    assert store.pending(1) == [0]
    with pytest.raises(DataError, match="epochs \\[1, 2, 3\\] were never written"):
        store.finish(0, seed=0)


def test_a_store_for_another_model_is_refused(tmp_path):
    url = str(tmp_path / "s")
    open_store(url)
    narrow = digits_spec(width=4)
    with pytest.raises(
        StoreMismatch,
        match=r"recorded for convnet\(channels=1, depth=2, .*width=8\), not convnet\(.*width=4\)",
    ):
        open_store(url, spec=narrow)
    with pytest.raises(
        StoreMismatch,
        match=r"blocks.0.conv.weight is float32\[4, 1, 3, 3\], the store has float32\[8, 1, 3, 3\].* \(and 4 more\)",
    ):
        TrajectoryStore.open(url).check_compatible(digits_spec().model_dump(mode="json"), spec_params(narrow))
    params, spec = spec_params(digits_spec()), digits_spec().model_dump(mode="json")
    with pytest.raises(StoreMismatch, match="recorded on data 'digits-1500', not 'cifar10'"):
        StoreWriter.create_or_open(url, spec, params, "cifar10", CONFIG.model_dump())
    other_recipe = CONFIG.model_copy(update={"lr": 0.01}).model_dump()
    with pytest.raises(StoreMismatch, match="lr=0.05, not lr=0.01"):
        StoreWriter.create_or_open(url, spec, params, "digits-1500", other_recipe)


def test_a_corrupted_shard_fails_verify_naming_the_file(digits, tmp_path):
    data, val = digits
    store = open_store(str(tmp_path / "s"))
    record(store, 0, data, val)
    shard = tmp_path / "s" / "experts" / "expert-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="expert-00000.safetensors: .* sha256"):
        TrajectoryStore.open(store.url).verify(0)


def test_a_fresh_lease_is_skipped_and_a_stale_one_taken_over(digits, tmp_path):
    url = str(tmp_path / "s")
    first, second = open_store(url, owner="job-a"), open_store(url, owner="job-b")
    assert first.claim(0)
    assert second.pending(2) == [1]
    assert not second.claim(0)
    assert first.pending(2) == [0, 1]  # its own lease does not hide an expert from its owner

    lease_url = storage.join(url, "partial", "expert-00000", "lease.json")
    storage.write_json(lease_url, {"owner": "job-a", "heartbeat": time.time() - 3600})
    assert second.pending(2) == [0, 1]
    assert second.claim(0)
    assert (
        json.loads((tmp_path / "s" / "partial" / "expert-00000" / "lease.json").read_text())["owner"]
        == "job-b"
    )

    data, _ = digits
    state = one_epoch(data, seed=0)
    with pytest.raises(LeaseLost, match="taken over"):
        first.write_epoch(0, 1, state.params, state)
