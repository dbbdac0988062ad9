"""Coreset selection on hand-made features: what each method must pick."""

from __future__ import annotations

import pytest
import torch

from engine.errors import DataError
from engine.select import CORESETS, CoresetInputs, coresets


def test_random_takes_k_per_class_and_is_seeded():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2])
    picks = coresets.random_coreset(len(labels), 2, labels, torch.Generator().manual_seed(3))
    assert labels[picks].tolist() == [0, 0, 1, 1, 2, 2] and len(set(picks.tolist())) == 6
    again = coresets.random_coreset(len(labels), 2, labels, torch.Generator().manual_seed(3))
    assert torch.equal(picks, again)


def test_herding_matches_the_class_mean_greedily():
    features = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.5]])  # mean 5.1
    picks = coresets.herding(features, 2, None).tolist()
    assert picks[0] == 4  # 5.5 is nearest the mean
    assert picks[1] == 2  # then 4.0: (5.5 + 4.0) / 2 = 4.75 is nearest 5.1 among the pairs


def test_kcenter_traverses_farthest_first_from_the_centre():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 9.0], [0.5, 0.5]])
    picks = coresets.kcenter(features, 3, None).tolist()
    assert picks == [4, 2, 3]  # nearest the mean (2.3, 1.9), then the farthest from the picks, twice


def test_forgetting_picks_the_most_forgotten_per_class():
    history = [torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0, 1, 0]),
               torch.tensor([0, 1, 1, 1])]
    counts = coresets.forgetting_events([h.bool() for h in history])
    assert counts.tolist() == [2, 1, 0, 1]
    labels = torch.tensor([0, 0, 1, 1])
    picks = coresets.forgetting(counts, 1, labels, torch.Generator().manual_seed(0))
    assert picks.tolist() == [0, 3]


def test_a_class_smaller_than_k_is_a_clear_error():
    with pytest.raises(DataError, match="class 1 has 1 samples, fewer than the 2 a coreset needs"):
        coresets.herding(torch.randn(3, 2), 2, torch.tensor([0, 0, 1]))


def test_the_registry_computes_features_only_for_the_methods_that_need_them():
    labels = torch.tensor([0, 0, 1, 1])

    def no_features():
        raise AssertionError("random selection must not compute features")

    inputs = CoresetInputs(4, labels, no_features, no_features)
    picks = CORESETS["random"](1, inputs, torch.Generator().manual_seed(0))
    assert labels[picks].tolist() == [0, 1]
    features = CoresetInputs(4, labels, lambda: torch.tensor([[0.0], [1.0], [5.0], [6.0]]), no_features)
    assert CORESETS["herding"](1, features, torch.Generator()).tolist() in ([0, 2], [0, 3], [1, 2], [1, 3])
    assert set(CORESETS) == {"random", "herding", "kcenter", "forgetting"}
