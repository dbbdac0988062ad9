"""Memory must not grow with the dataset: one streamed expert epoch at two dataset sizes, side by side.

    uv run python benchmarks/scale.py                         # 25,000 and 250,000 images (about 2 h on 2 CPUs)
    uv run python benchmarks/scale.py --sizes 5000 50000      # the same comparison, smaller
    uv run python benchmarks/scale.py --skip-scale            # only the CIFAR-10 streaming vs cache ratio

1. Writes an ImageNet-shaped dataset: 1,000 classes of 64 px JPEGs made from the 1,000 real images in
   ../shared/data/imagenet-samples (one per class) by random crops, flips and colour jitter.
2. For each size, in a fresh process and a fresh local Ray cluster, runs the buffer stage of
   configs/imagenet1k.yaml (ConvNet-4, 64 px, batch 256, DSA) for one expert and one epoch with the
   training split streamed (data.cache: none): a streamed pass for the input transform, then the epoch.
3. Prints images/s and the peak resident memory of the driver and of every Ray worker process that ran
   (sampled every 0.5 s while the job runs, so processes that exit before the end, such as the expert's
   Ray Train worker, are counted): their sum and max, the peak of the sum over processes alive together,
   and as its last line the ratio of the sums of peaks (driver + every worker process), large over small.
4. On CIFAR-10 (50,000 images, configs/cifar10.yaml's ConvNet-3) prints the throughput of one streamed
   epoch against one epoch from the cache (decoded once, kept in the object store): the cost of
   decoding every epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT.parent / "shared" / "data" / "imagenet-samples"
CIFAR_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[25_000, 250_000], help="small and large size")
    parser.add_argument("--folder", default=None, help="where datasets are written (default: a temporary folder)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--skip-scale", action="store_true", help="only the CIFAR-10 ratio")
    parser.add_argument("--skip-cifar", action="store_true", help="only the memory ratio")
    parser.add_argument("--child", nargs=5, metavar=("CONFIG", "SHARDS", "RUN_DIR", "CACHE", "CPUS"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- data ------------------------------------------------------------------------------------------------


def write_imagenet_like(folder: Path, size: int) -> Path:
    """``size`` 64 px JPEGs of 1,000 classes from the real ImageNet samples, as shards."""
    import numpy as np
    from PIL import Image, ImageEnhance

    from engine.data.writers import shard_dataset

    shards = folder / f"imagenet-{size}"
    if (shards / "manifest.json").exists():
        return shards
    images = sorted((SAMPLES / "images").iterdir())
    wnids = [p.name.split("_", 1)[0] for p in images]
    source = folder / f"imagenet-{size}-jpegs"
    rng = np.random.default_rng(size)
    originals = [Image.open(p).convert("RGB") for p in images]
    for i in range(size):
        c = i % len(originals)
        image = originals[c]
        w, h = image.size
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        view = image.crop((x, y, x + cw, y + ch)).resize((64, 64), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            view = enhancer(view).enhance(rng.uniform(0.7, 1.3))
        (source / wnids[c]).mkdir(parents=True, exist_ok=True)
        view.save(source / wnids[c] / f"{i}.jpg", quality=90)
    shard_dataset("imagefolder", str(source), str(shards), shard_size=2000, progress=False)
    return shards


def write_cifar(folder: Path) -> Path:
    from engine.data.writers import shard_dataset

    shards = folder / "cifar10"
    if (shards / "manifest.json").exists():
        return shards
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        tar.extractall(folder / "cifar10-jpegs", filter="data")
    shard_dataset("imagefolder", str(folder / "cifar10-jpegs" / "train"), str(shards), shard_size=5000, progress=False)
    return shards


# --- one measured run (a child process: its own driver, its own Ray cluster) ------------------------------


def child(config_path: str, shards: str, run_dir: str, cache: str, cpus: str) -> dict:
    import ray

    from engine.config import load_config
    from engine.experiment import ExperimentConfig
    from engine.runtime import RayRuntime
    from engine.stages import buffer

    config = load_config(ExperimentConfig, config_path, [
        f"run_dir={run_dir}", f"data.shards={shards}", f"data.cache={cache}", "experts.num_experts=1",
        "experts.train.epochs=1", "experts.val_split=null", "resources.cpus_per_worker=1",
        "resources.gpus_per_worker=0", "resources.distill_workers=0", "resources.use_ray=true",
        f"resources.num_cpus={cpus}", "distill.max_start_epoch=1", "distill.expert_epochs=1", "pipeline.per_ipc={}"])
    runtime = RayRuntime(config.resources)
    monitor = ProcessMonitor()
    monitor.start()
    started = time.perf_counter()
    manifest = buffer.prepare_data(config)
    spec = buffer.model_spec(config, manifest)
    plan, _ = buffer.build_plan(config, manifest, spec, runtime)  # a streamed pass: the input transform
    planned = time.perf_counter()
    runtime.train_experts(plan, [0], buffer.print_progress)
    finished = time.perf_counter()
    monitor.stop()
    ray.shutdown()
    return {"images": manifest.splits[config.data.split].num_samples, "plan_s": planned - started,
            "epoch_s": finished - planned, "driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "workers": list(monitor.peaks.values()), "peak_total": monitor.peak_total, "by_name": monitor.by_name()}


class ProcessMonitor(threading.Thread):
    """Every half second, the resident memory of every Ray worker process of this job's own local cluster
    (the driver's descendants: actors, tasks, idle workers, their launchers; not the processes of another
    Ray cluster on the machine): each process's peak (VmHWM, kept after it exits) and the peak of the sum
    over the processes alive together (this driver included)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.names, self.peak_total = interval, {}, {}, 0
        self.started = time.perf_counter()
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            total = me.memory_info().rss
            for process in _descendants(me):  # this job's Ray cluster only: not another one on the machine
                if _is_ray_worker(process) and (peak := _peak_rss(process.pid)):
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), peak)
                    title = _title(process)
                    if process.pid not in self.names or title.startswith("ray::") and title != "ray::IDLE":
                        self.names[process.pid] = title  # what it ran (an idle worker keeps its last task's name)
                    total += _rss(process)
            self.peak_total = max(self.peak_total, total)
            self._done.wait(self.interval)

    def by_name(self) -> dict[str, list[int]]:
        """Process title -> [processes, sum of their peaks]: where the memory went."""
        out: dict[str, list[int]] = {}
        for pid, peak in self.peaks.items():
            entry = out.setdefault(self.names.get(pid, "?"), [0, 0])
            entry[0] += 1
            entry[1] += peak
        return out

    def stop(self) -> None:
        self._done.set()
        self.join()


def _descendants(process) -> list:
    import psutil

    try:
        children = process.children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            child.info = {"cmdline": child.cmdline()}
        except psutil.Error:
            child.info = {"cmdline": []}
    return children


def _is_ray_worker(process) -> bool:
    cmdline = " ".join(process.info.get("cmdline") or [])
    return "default_worker.py" in cmdline or cmdline.startswith("ray::")


def _title(process) -> str:
    cmdline = " ".join(process.info.get("cmdline") or [])
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]
    return "uv run (worker launcher)" if "uv" in cmdline.split()[0] else "worker starting"


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _rss(process) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # noqa: BLE001 - it exited between the listing and now
        return 0


def measure(config: str, shards: Path, folder: Path, cache: str, cpus: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="scale-run-", dir=folder)
    out = subprocess.run([sys.executable, __file__, "--child", config, str(shards), run_dir, cache, str(cpus)],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measured run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    folder = Path(args.folder or tempfile.mkdtemp(prefix="distill-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not args.skip_cifar:
        cifar = write_cifar(folder)
        config = str(REPO_ROOT / "configs" / "cifar10.yaml")
        streamed, cached = (measure(config, cifar, folder, cache, args.num_cpus) for cache in ("none", "memory"))
        ratio = streamed["epoch_s"] and cached["epoch_s"] / streamed["epoch_s"]
        print("\nCIFAR-10, 50,000 images, ConvNet-3, one expert epoch on", args.num_cpus, "CPUs")
        print("| data | epoch s | images/s |\n|---|---|---|")
        for name, run in (("streamed (decoded every epoch)", streamed), ("cache (decoded once)", cached)):
            print(f"| {name} | {run['epoch_s']:.1f} | {run['images'] / run['epoch_s']:.0f} |")
        print(f"throughput streamed / cached: {ratio:.2f}x")
    if args.skip_scale:
        return 0
    runs = {size: measure(str(REPO_ROOT / "configs" / "imagenet1k.yaml"), write_imagenet_like(folder, size),
                          folder, "none", args.num_cpus) for size in args.sizes}
    print("\nImageNet-shaped, 1,000 classes, 64 px, ConvNet-4: the input-transform pass, then one expert epoch, "
          f"streamed, {args.num_cpus} CPUs")
    print("| images | transform pass s | epoch s | images/s | driver peak GiB | worker processes | worker peaks "
          "sum GiB | worker peak max GiB | sum of all peaks GiB | peak of the sum GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = {}
    for size, run in runs.items():
        totals[size] = run["driver"] + sum(run["workers"])
        print(f"| {size:,} | {run['plan_s']:.1f} | {run['epoch_s']:.1f} | {size / run['epoch_s']:.0f} | "
              f"{gib(run['driver'])} | {len(run['workers'])} | {gib(sum(run['workers']))} | "
              f"{gib(max(run['workers'], default=0))} | {gib(totals[size])} | {gib(run['peak_total'])} |")
    print("\nworker processes by what they ran (processes / sum of their peaks GiB), small and large:")
    for name in sorted({n for run in runs.values() for n in run["by_name"]}):
        cells = [f"{run['by_name'].get(name, [0, 0])[0]} / {gib(run['by_name'].get(name, [0, 0])[1])}"
                 for run in runs.values()]
        print(f"  {name:<40} " + "   ".join(cells))
    small, large = args.sizes
    print(f"peak of the sum of all processes' memory, ratio {large}/{small}: "
          f"{runs[large]['peak_total'] / runs[small]['peak_total']:.2f}x")
    print(f"peak memory ratio {large}/{small}: {totals[large] / totals[small]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
