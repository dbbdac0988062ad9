"""What a result was produced with: package versions and the source commit, for results files."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("distill-engine", "torch", "ray", "numpy", "open_clip_torch", "peft", "transformers", "safetensors")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str]:
    """Python and the packages that decide a result's numbers (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def source_commit() -> str | None:
    """The git commit of the engine's source, ``+dirty`` when tracked files differ from it; None outside a
    git checkout (e.g. a Ray job's working_dir upload)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10,
                            check=True)
    return result.stdout.strip()
