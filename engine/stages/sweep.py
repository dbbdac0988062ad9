"""The sweep stage: search distillation hyper-parameters with Ray Tune (``runtime.sweep``).

    check sweep.space against the config -> one trial per sample of the space, each a distillation in
    <run_dir>/sweep/trials/<id>/ reporting a quick validation score every sweep.report_every iterations
    (ASHA stops poor ones) -> <run_dir>/sweep/results.json and results.md (every trial, stopped early or
    not) and <run_dir>/sweep/best.yaml: the whole config with the best values, ready to run

All trials read the same expert store; the experts come from the buffer stage first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from engine import storage
from engine.config import to_yaml, with_overrides
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig
from engine.resources import default_device
from engine.search import check_searcher
from engine.stages import Runtime
from engine.stages import distill as distill_stage
from engine.stages.evaluate import quick_score


def check_space(config: ExperimentConfig) -> None:
    """Every key of the space names a config key that accepts the space's first value."""
    check_searcher(config.sweep)
    if not config.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one key to search over")
    for key, spec in config.sweep.space.items():
        kind, values = next(iter(spec.items()))
        sample = values[0]
        try:
            with_overrides(config, {key: sample})
        except ConfigError as err:
            raise ConfigError(f"sweep.space.{key}: {kind} value {sample!r} does not fit the config ({err})") from None


def trial_dir(config: ExperimentConfig, trial_id: str) -> str:
    return storage.join(config.run_dir, "sweep", "trials", trial_id)


def run_trial(values: dict[str, Any], trial_id: str, report: Callable[[dict[str, float]], None],
              base: ExperimentConfig, runtime: Runtime) -> None:
    """One trial: distil with ``values`` applied in its own folder, reporting a quick validation score."""
    config = with_overrides(base, values, run_dir=trial_dir(base, trial_id),
                            **{"experts.store": base.store_url, "evaluate.split": base.experts.val_split or "val"})
    scorer = quick_score(config, runtime)
    every, last = config.sweep.report_every, config.distill.iterations

    def on_iteration(iteration: int, loss: float, synthetic) -> None:
        if iteration % every == 0 or iteration == last:
            report({config.sweep.metric: scorer(synthetic), "iteration": iteration, "matching_loss": loss})

    worker = distill_stage.prepare(config, config.distill, runtime, on_iteration=on_iteration)
    worker(default_device(), progress=False)


def run(config: ExperimentConfig, runtime: Runtime, trial_runtime: Runtime) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; ``trial_runtime`` is what each trial decodes its data with."""
    check_space(config)
    trial = functools.partial(run_trial, base=config, runtime=trial_runtime)
    grid = runtime.sweep(trial, config.sweep, config.distill.iterations,
                         config.sweep.storage or storage.join(config.run_dir, "sweep", "tune"), config.storage)
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
