"""Progress in logs (one line per step of the way, never a redrawn bar) and the run's pictures."""

from __future__ import annotations

import io

from PIL import Image

from engine.plots import loss_png, metric_by_size_png
from engine.progress import LogLines, progress


def test_a_log_gets_one_line_per_twentieth_not_a_bar(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = progress(range(3, 40), desc="distill", total=40, initial=3)  # pytest's stderr is not a terminal
    assert isinstance(bar, LogLines)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [f"{n}/40" for n in range(4, 41, 2)]
    assert lines[-1].startswith("distill: 40/40 it, ") and lines[-1].endswith("loss=0.0250")


def test_tqdm_disable_and_other_ranks(capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with progress(desc="shard", total=100, unit="item") as bar:
        bar.update(60)
        bar.update(40)
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["shard: 60/100 item",
                                                                                    "shard: 100/100 item"]
    quiet = progress(range(5), desc="distill", total=5, enabled=False)
    assert list(quiet) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().out == ""


def test_pictures_of_a_run():
    curve = Image.open(io.BytesIO(loss_png([0.5, 0.4, 0.3, 0.35], [{"iteration": 2, "loss": 0.45},
                                                                  {"iteration": 4, "loss": 0.325}], "mtt")))
    assert curve.format == "PNG" and curve.size == (768, 432)
    rows = [{"method": m, "size": s, "metric": k, "mean": 50.0 + s / 10, "std": 1.0}
            for m in ("distilled:vl", "random") for s in (100, 500) for k in ("img_r1", "txt_r1")]
    rows.append({"method": "full", "size": 600, "metric": "img_r1", "mean": 80.0, "std": 2.0})
    picture = Image.open(io.BytesIO(metric_by_size_png(rows, "test split")))
    assert picture.size == (768, 864)  # a panel per metric
