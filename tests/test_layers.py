"""The dependency rule, read from every module's imports (lazy ones inside functions included):

    core      engine/{data,models,trajectories,distill,select,labels,evaluate}, engine/*.py
              -> never engine.experiment, engine.stages, engine.runtime, ray
    experiment.py -> core only
    stages    engine/stages  -> core and experiment; never engine.runtime or ray (a runtime is passed in)
    runtime   engine/runtime -> core and ray; never engine.experiment or engine.stages
    jobs/, engine/cli.py     -> anything
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "core": ("engine.experiment", "engine.stages", "engine.runtime", "ray", "jobs"),
    "experiment": ("engine.stages", "engine.runtime", "ray", "jobs"),
    "stages": ("engine.runtime", "ray", "jobs"),
    "runtime": ("engine.experiment", "engine.stages", "jobs"),
}


def layer_of(relative: Path) -> str | None:
    parts = relative.parts
    if parts[0] != "engine" or parts == ("engine", "cli.py"):
        return None  # jobs, tests, benchmarks and the command line may import anything
    if len(parts) == 2:
        return "experiment" if relative.name == "experiment.py" else "core"
    return {"stages": "stages", "runtime": "runtime"}.get(parts[1], "core")


def violations(path: Path, relative: Path) -> list[str]:
    layer = layer_of(relative)
    if layer is None:
        return []
    return [f"{relative}:{line} ({layer}) imports {module}" for line, module in imported_modules(path)
            if any(module == banned or module.startswith(banned + ".") for banned in FORBIDDEN[layer])]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


MODULES = sorted((ROOT / "engine").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_module_imports_only_what_its_layer_may(path):
    found = violations(path, path.relative_to(ROOT))
    assert not found, "the layer rule is broken: " + "; ".join(found)


def test_the_rule_catches_lazy_and_package_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import ray.data\n    from engine.experiment import ExperimentConfig\n")
    assert len(violations(probe, Path("engine/data/probe.py"))) == 2
    assert len(violations(probe, Path("engine/runtime/probe.py"))) == 1  # runtime may use Ray
    assert violations(probe, Path("jobs/probe.py")) == []
