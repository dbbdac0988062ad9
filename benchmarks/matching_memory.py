"""Peak memory and time of one trajectory-matching iteration: ``unrolled`` vs ``exact`` gradients.

    uv run python benchmarks/matching_memory.py                       # ConvNet-3, 32 px, IPC 10, N = 10..80
    uv run python benchmarks/matching_memory.py --steps 5 10 --ipc 1  # quicker
    uv run python benchmarks/matching_memory.py --device cuda         # on a GPU (peak CUDA memory)

Three variants: ``unrolled``; ``exact`` keeping all N + 1 parameter vectors (``exact_stride: 1``);
``exact`` keeping every ⌈√N⌉-th vector (the default). Each (variant, N) runs in a fresh child process, so peaks do not mix: one warm-up iteration of N=2,
then one timed iteration of N steps (MTT's setting: 10 classes x IPC images, every image in every
step, DSA on). On the CPU the peak is the child's peak resident set size (reset just before the iteration)
minus its resident size at that moment (torch, the model and the data); the child runs under an address-space
limit (``--memory-limit-gb``, default: the machine's available memory less 2 GB), so a
configuration that does not fit fails to allocate and is reported as such instead of taking the
machine down. On CUDA the peak is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2**30
# unrolled autograd; exact keeping all N + 1 parameter vectors; exact keeping ~2 sqrt(N) (the default)
VARIANTS = ("unrolled", "exact:1", "exact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80], help="N values")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-limit-gb", type=float, help="address-space limit of each child (CPU)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(args: argparse.Namespace) -> dict:
    """One (mode, N) measurement in this process; returns a JSON-able result."""
    import torch

    from engine.distill.base import MethodSetup, init_synthetic
    from engine.distill.matching import match_trajectory
    from engine.distill.mtt import MTT
    from engine.distill.mtt import Config as DistillConfig
    from engine.models import ModelSpec, build_model, get_flat, select_parameters

    variant, steps = args.child[0], int(args.child[1])
    mode, _, stride = variant.partition(":")  # "exact:1" keeps all N + 1 parameter vectors
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = ModelSpec.create("convnet", channels=3, num_classes=10, image_size=args.image_size, width=args.width,
                            depth=args.depth)
    model = build_model(spec).to(device)
    names = select_parameters(model, "all")
    real = torch.randn(10 * args.ipc, 3, args.image_size, args.image_size, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(args.ipc)

    def iteration(n: int) -> float:
        config = DistillConfig(ipc=args.ipc, syn_steps=n, gradient=mode, max_start_epoch=2)
        synthetic = init_synthetic(real, labels, 10, config.ipc, config.init, torch.Generator().manual_seed(0), 0.01)
        synthetic.images.requires_grad_(True)
        synthetic.alphas.requires_grad_(True)
        method = MTT(config, MethodSetup(model, names, device))
        start = get_flat(model, names)
        target = start + 0.01 * torch.randn_like(start)
        problem = method.problem(synthetic, torch.Generator().manual_seed(1))
        began = time.perf_counter()
        match_trajectory(problem, start, target, synthetic.alphas, method.groups, n, [synthetic.images], mode,
                         int(stride) if stride else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    iteration(2)  # warm-up: allocator pools, kernel choice
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    seconds = iteration(steps)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    return {"mode": variant, "steps": steps, "seconds": seconds, "peak_bytes": peak}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def measure(args: argparse.Namespace, mode: str, steps: int, limit: int | None) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(steps), "--ipc", str(args.ipc), "--image-size",
               str(args.image_size), "--width", str(args.width), "--depth", str(args.depth), "--device", args.device]

    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=cap)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return {"mode": mode, "steps": steps, "error": reason[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    limit = None
    if args.device == "cpu":
        limit = int((args.memory_limit_gb * GIB) if args.memory_limit_gb else available_bytes() - 2 * GIB)
    print(f"ConvNet-{args.depth} (width {args.width}) on {args.image_size} px, 10 classes x IPC {args.ipc}, "
          f"device {args.device}" + (f", limit {limit / GIB:.1f} GiB per run" if limit else ""), flush=True)
    results: dict[tuple[str, int], dict] = {}
    for steps in args.steps:
        for mode in VARIANTS:
            result = measure(args, mode, steps, limit)
            results[mode, steps] = result
            shown = (f"{result['peak_bytes'] / GIB:7.2f} GiB  {result['seconds']:8.2f} s" if "error" not in result
                     else f"does not fit: {result['error']}")
            print(f"  {mode:<8} N={steps:<3} {shown}", flush=True)
    print_table(args.steps, results)
    return 0


def cell(result: dict) -> tuple[str, str]:
    if "error" in result:
        return "does not fit", "-"
    return f"{result['peak_bytes'] / GIB:.2f}", f"{result['seconds']:.2f}"


def print_table(steps: list[int], results: dict[tuple[str, int], dict]) -> None:
    print("\n|   N | unrolled peak GiB | unrolled s/it | exact (all vectors) peak GiB | s/it "
          "| exact (sqrt N vectors) peak GiB | s/it | time exact / unrolled |")
    print("|---|---|---|---|---|---|---|---|")
    for n in steps:
        unrolled, every, sqrt = (results[v, n] for v in VARIANTS)
        ratio = (f"{sqrt['seconds'] / unrolled['seconds']:.2f}x" if "error" not in unrolled and "error" not in sqrt
                 else "-")
        cells = [c for r in (unrolled, every, sqrt) for c in cell(r)]
        print(f"| {n:>3} | {' | '.join(cells)} | {ratio} |")
    for variant, name in zip(VARIANTS, ("unrolled", "exact (all vectors)", "exact (sqrt N vectors)"), strict=True):
        fitted = [n for n in steps if "error" not in results[variant, n]]
        if len(fitted) >= 2:
            low, high = results[variant, fitted[0]], results[variant, fitted[-1]]
            print(f"{name}: peak at N={fitted[-1]} is {high['peak_bytes'] / max(low['peak_bytes'], 1):.2f}x "
                  f"its peak at N={fitted[0]}")


if __name__ == "__main__":
    sys.exit(main())
