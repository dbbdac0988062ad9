"""distill sweep <config.yaml> [key=value ...]: search distillation hyper-parameters with Ray Tune.

    load config -> check sweep.space against the config -> experts (buffer; skipped when complete)
    -> one Tune trial per sample of the space, each a distillation in <run_dir>/sweep/trials/<id>/
       reporting a quick validation score every sweep.report_every iterations (ASHA stops poor ones)
    -> <run_dir>/sweep/results.json and results.md (every trial, stopped early or not)
       and <run_dir>/sweep/best.yaml: the whole config with the best values, ready to run

Running the same command again resumes an interrupted sweep. Example space (in the config):

    sweep:
      space:
        distill.lr_img: {loguniform: [10, 1000]}
        distill.syn_steps: {choice: [10, 20, 40]}
        distill.init: {grid: [real, noise]}
"""

from __future__ import annotations

import sys
from typing import Any

from engine import cli, storage
from engine.config import to_yaml
from engine.experiment import ExperimentConfig, run_job
from engine.runtime.cluster import init_ray
from engine.runtime.sweep import check_space, run_sweep, with_overrides
from jobs.buffer import run_buffer


def run(config: ExperimentConfig) -> list[dict[str, Any]]:
    check_space(config)
    init_ray(config.resources)
    run_buffer(config)
    grid = run_sweep(config)
    rows = trial_rows(config, grid)
    write_outputs(config, rows)
    return rows


def trial_rows(config: ExperimentConfig, grid) -> list[dict[str, Any]]:
    """One row per trial: its values, last score, number of reports and how it ended."""
    sweep = config.sweep
    reports_wanted = -(-config.distill.iterations // sweep.report_every)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        reports = int(metrics.get("training_iteration", 0))
        if result.error is not None:
            status = f"error: {str(result.error).splitlines()[0][:80]}"
        elif reports < reports_wanted:
            status = "stopped early (ASHA)"
        else:
            status = "complete"
        rows.append({"trial": metrics.get("trial_id", result.path.rsplit("/", 1)[-1]),
                     "values": {key: result.config.get(key) for key in sweep.space},
                     sweep.metric: metrics.get(sweep.metric), "reports": reports, "status": status})
    return sorted(rows, key=lambda r: r["trial"])


def best_row(config: ExperimentConfig, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rows if r[config.sweep.metric] is not None and r["status"] == "complete"]
    scored = scored or [r for r in rows if r[config.sweep.metric] is not None]
    if not scored:
        return None
    sign = 1 if config.sweep.mode == "max" else -1
    return max(scored, key=lambda r: sign * r[config.sweep.metric])


def write_outputs(config: ExperimentConfig, rows: list[dict[str, Any]]) -> None:
    out = storage.join(config.run_dir, "sweep")
    metric = config.sweep.metric
    keys = list(config.sweep.space)
    lines = ["| trial | " + " | ".join(keys) + f" | {metric} | reports | status |",
             "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        score = f"{r[metric]:.2f}" if r[metric] is not None else "-"
        values = " | ".join(_shown(r["values"][k]) for k in keys)
        lines.append(f"| {r['trial']} | {values} | {score} | {r['reports']} | {r['status']} |")
    table = "\n".join(lines) + "\n"
    best = best_row(config, rows)
    storage.write_json(storage.join(out, "results.json"), {"trials": rows, "best": best}, config.storage)
    storage.write_text(storage.join(out, "results.md"), table, config.storage)
    print(f"\n{table}", flush=True)
    if best is not None:
        best_config = with_overrides(config, best["values"], run_dir=storage.join(out, "best"),
                                     **{"experts.store": config.store_url})
        url = storage.join(out, "best.yaml")
        header = f"# Best of the sweep in {storage.redact(out)}: {metric} {best[metric]:.2f} ({best['trial']})\n"
        storage.write_text(url, header + f"#   uv run distill distill {storage.redact(url)}\n" + to_yaml(best_config),
                           config.storage)
        print(f"best: {best['values']} ({metric} {best[metric]:.2f}) -> {storage.redact(url)}", flush=True)


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    return run_job(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(cli.main(["sweep", *sys.argv[1:]]))
