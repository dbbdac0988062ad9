import pytest
import torch

from engine.evaluate.metrics import recall_at_k


def test_recall_with_several_captions_per_image():
    # 2 images; texts 0,1 belong to image 0 and texts 2,3 to image 1.
    text_to_image = torch.tensor([0, 0, 1, 1])
    similarity = torch.tensor([
        [0.1, 0.9, 0.8, 0.0],   # image 0: best text is 1 (its own) -> TR@1 hit
        [0.7, 0.2, 0.1, 0.3],   # image 1: best text 0 (wrong), its own text 3 is 2nd -> TR@1 miss
    ])
    r = recall_at_k(similarity, text_to_image, ks=(1, 2))
    assert r["tr_r1"] == pytest.approx(50.0)
    assert r["tr_r2"] == pytest.approx(100.0)
    # IR: text 0 -> image 1 (0.7 > 0.1) miss; text 1 -> image 0 hit; text 2 -> image 0 miss; text 3 -> image 1 hit.
    assert r["ir_r1"] == pytest.approx(50.0)
    assert r["ir_r2"] == pytest.approx(100.0)
    assert r["rsum"] == pytest.approx(300.0)


def test_perfect_and_reversed_rankings():
    eye = torch.eye(4)
    assert recall_at_k(eye, torch.arange(4), ks=(1,))["tr_r1"] == 100.0
    assert recall_at_k(-eye, torch.arange(4), ks=(1,))["ir_r1"] == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
