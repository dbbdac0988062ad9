"""Every seed the engine derives from a config's seeds, in ranges that cannot overlap.

A network built from seed s starts at exactly the parameters of every other network built from s.
The distilled data is optimised to work from the experts' starting points θ*_0, so an evaluation
network or a forgetting run that started from one of them would give the distilled set help that no
coreset gets. Each use therefore draws from its own stream of the 32-bit seed space (torch's CPU
generator keeps only the low 32 bits of a seed: ``manual_seed(2**32)`` is ``manual_seed(0)``):

    seed = stream · 2^30 + base · 2^16 + index
           stream   0 experts, 1 evaluation networks, 2 forgetting runs, 3 coreset draws
           base     the config's seed (experts.seed, evaluate.seed), 0 ≤ base < 2^14
           index    expert id, evaluation repeat or coreset size, 0 ≤ index < 2^16

Distinct (stream, base, index) give distinct seeds below 2^32, so no evaluation network ever starts
where an expert started, whatever the two config seeds are. Expert i of base seed 0 keeps seed i,
as stores written before this scheme have it.
"""

from __future__ import annotations

from engine.errors import ConfigError

STREAMS = ("expert", "evaluate", "forgetting", "coreset")
STREAM_SHIFT, BASE_SHIFT = 30, 16
MAX_BASE_SEED = 2 ** (STREAM_SHIFT - BASE_SHIFT)  # exclusive bound of a config's seed
MAX_INDEX = 2**BASE_SHIFT


def stream_seed(stream: str, base: int, index: int = 0) -> int:
    """Seed number ``index`` of ``stream`` for the config seed ``base``; a ConfigError names what is out of range."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; streams: {', '.join(STREAMS)}")
    if not 0 <= base < MAX_BASE_SEED:
        raise ConfigError(f"{'experts' if stream == 'expert' else 'evaluate'}.seed must be in "
                          f"[0, {MAX_BASE_SEED}), got {base}")
    if not 0 <= index < MAX_INDEX:
        raise ConfigError(f"{stream} seed index must be in [0, {MAX_INDEX}), got {index}")
    return (STREAMS.index(stream) << STREAM_SHIFT) + (base << BASE_SHIFT) + index


def expert_seed(base: int, expert: int) -> int:
    """The seed expert ``expert`` of a store is initialised and trained with."""
    return stream_seed("expert", base, expert)


def evaluation_seeds(base: int, repeats: int) -> list[int]:
    """The seeds of the ``repeats`` fresh networks trained on every evaluated set."""
    return [stream_seed("evaluate", base, r) for r in range(repeats)]
