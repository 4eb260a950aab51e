"""Training throughput of two models measured side by side (what `scripts/gpu_model_evidence.py` reports).

The alternating rounds (`alternating_rounds`, `ratio_summary`) also time the kernels against
fla's in `scripts/bench_kernels.py`, beside their GPU time (`gpu_time_us`).

A single timed block per model is at the mercy of whatever the GPU does meanwhile (clocks,
other tenants, a kernel autotuned in the first steps). So each model is first measured alone
for its peak memory, and then both stay resident and are timed in alternating blocks, the
order reversed every round (A B, B A, A B, ...), so that a drift in the machine's speed falls
on both alike. The ratio is taken per round and summarised by its median and range.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def fla_deltanet_kwargs(config) -> dict:
    """Arguments of fla's `DeltaNetConfig` for the DeltaNet with an `OSDNConfig`'s shape: the peer
    of the model-level comparisons (`scripts/gpu_model_evidence.py`, `scripts/bench_generate.py`)."""
    return dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_heads=config.num_heads,
        expand_k=config.expand_k,
        expand_v=config.expand_v,
        use_short_conv=True,
        conv_size=config.conv_size,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def training_step(model: torch.nn.Module, batch: int, seq: int, device: str) -> Callable[[], None]:
    """One AdamW step of `model` on random tokens, under bf16 autocast on CUDA."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _seconds(step: Callable[[], None], steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_alone(
    step: Callable[[], None], tokens_per_step: int, steps: int, device: str, warmup: int = 2, base_bytes: int = 0
) -> dict:
    """Tokens per second and peak memory (MiB, CUDA only) of `steps` steps after `warmup` untimed ones.

    `base_bytes` is what was allocated before the model was built (another model kept resident);
    it is taken off the peak, so the peak is this model's own: weights, optimizer state, activations.
    """
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = _seconds(step, steps, device)
    peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20 if device == "cuda" else None
    return {"tokens_per_s": tokens_per_step * steps / seconds, "peak_mib": peak, "steps": steps}


def alternating_rounds(
    fns: dict[str, Callable[[], object]], measure: Callable[[Callable[[], object]], float], rounds: int
) -> tuple[dict[str, list[float]], list[list[str]]]:
    """`measure` of each of `fns` once a round for `rounds` rounds, the order reversed every round
    (A B, B A, A B, ...): the values by name, one a round, and the order of each round.

    Example:
        >>> values, orders = alternating_rounds({"a": 1, "b": 2}, lambda f: f * 10, rounds=2)
        >>> values, orders
        ({'a': [10, 10], 'b': [20, 20]}, [['a', 'b'], ['b', 'a']])
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    values = {name: [] for name in names}
    orders = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        orders.append(list(order))
        for name in order:
            values[name].append(measure(fns[name]))
    return values, orders


def ratio_summary(a: list[float], b: list[float], of: str) -> dict:
    """The per-round ratios `a / b` with their median, minimum and maximum."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"of": of, "per_round": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def alternate(
    steps_by_name: dict[str, Callable[[], None]], tokens_per_step: int, steps: int, rounds: int, device: str
) -> dict:
    """Tokens per second of each model over `rounds` rounds of `steps` steps, the order reversed every round.

    Returns the per-round figures, the order each round ran in, and for the first two names the
    per-round ratio (first / second) with its median, minimum and maximum.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got rounds={rounds}, steps={steps}")
    names = list(steps_by_name)
    per_round, orders = alternating_rounds(
        steps_by_name, lambda step: tokens_per_step * steps / _seconds(step, steps, device), rounds
    )
    result = {
        "rounds": rounds,
        "steps_per_round": steps,
        "orders": orders,
        "tokens_per_s": per_round,
        "median_tokens_per_s": {name: statistics.median(v) for name, v in per_round.items()},
    }
    if len(names) >= 2:
        result["ratio"] = ratio_summary(per_round[names[0]], per_round[names[1]], f"{names[0]} / {names[1]}")
    return result


def fwd_bwd_step(fwd: Callable[[], torch.Tensor], leaves, do: torch.Tensor) -> Callable[[], None]:
    """One forward+backward of `fwd` (its output's gradient `do`) as a closure. The leaves'
    gradients are dropped first, so no call adds into `.grad` (an add the timed op does not do)."""

    def step():
        for t in leaves:
            t.grad = None
        fwd().backward(do)

    return step


def cuda_profile(fn: Callable[[], object], calls: int = 1, warmup: int = 1):
    """The torch.profiler CUDA profile of `calls` calls of `fn`, after `warmup` untimed ones."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def gpu_time_us(fn: Callable[[], object], calls: int = 50) -> float:
    """GPU time (us) per call of everything `fn` launches (torch.profiler), without the host's
    time between launches."""
    prof = cuda_profile(fn, calls)
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls
