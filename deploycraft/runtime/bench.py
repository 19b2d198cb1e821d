"""Latency and throughput: warm-up, then timed runs interleaved across models in rounds.

Interleaving (model A, B, C, A, B, C, ...) spreads slow drifts of a shared machine evenly over the
models compared, so the ratios between them hold even when absolute times wander.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from deploycraft.progress import bar

# Worker threads left spinning after a run keep at it for more than 5 ms and less than 50 ms here: ONNX
# Runtime's spinning workers still slowed the model timed next with a 5 ms pause before its block, not with
# 50 ms (benchmarks/runtime_interference.py, README). The pause costs a flagship verify about 20 s.
# DEPLOYCRAFT_BENCH_IDLE_S overrides it (the test suite sets 0: its timings are not measurements).
IDLE_S = 0.05
IDLE_ENV = "DEPLOYCRAFT_BENCH_IDLE_S"


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV)
    if raw is None:
        return IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10:
        from deploycraft.errors import UserError

        raise UserError(f"{IDLE_ENV} is {raw!r}", field=IDLE_ENV, fix="give seconds between 0 and 10, e.g. 0.05")
    return value


def physical_cores() -> int:
    try:
        text = Path("/proc/cpuinfo").read_text()
        cores = {(line.split(":")[1].strip()) for line in text.splitlines() if line.startswith("core id")}
        sockets = {(line.split(":")[1].strip()) for line in text.splitlines() if line.startswith("physical id")}
        if cores:
            return len(cores) * max(1, len(sockets))
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass
class Latency:
    batch_size: int
    p50: float
    p90: float
    p99: float
    mean: float
    throughput_ips: float  # images per second at this batch size: batch / mean latency
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(times_s: list[float], batch_size: int) -> Latency:
    ms = np.asarray(times_s) * 1000.0
    return Latency(
        batch_size,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 90)),
        float(np.percentile(ms, 99)),
        float(ms.mean()),
        float(batch_size * 1000.0 / ms.mean()),
        len(ms),
    )


def prepare_input(runner, x: torch.Tensor):
    return runner.prepare(x) if hasattr(runner, "prepare") else x.numpy()


def cuda_time(runner: Callable, inp: Any) -> float:
    """Seconds of one call measured by CUDA events on the current stream (GPU runners: the clock the GPU
    keeps, not the host's; the runner's own synchronize ends the call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    runner(inp)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def measure(
    runners: dict[str, Callable],
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: list[int],
    warmup: int = 10,
    repeats: int = 100,
    rounds: int | None = None,
    show: bool = True,
    settle: int = 1,
    idle_s: float | None = None,
) -> dict[str, dict[int, Latency]]:
    """``repeats`` timed runs per model and batch size, in ``rounds`` (default: blocks of about 4 runs)
    that visit the models in turn. Each CPU block starts after ``idle_s`` of sleep (default ``idle_seconds()``), so
    that the worker threads the previous model left spinning (torch's OpenMP pool, ONNX Runtime's or
    OpenVINO's) have gone to sleep and do not take the cores from the model timed next; then ``settle``
    untimed runs wake the model's own pool, and only then is it timed."""
    idle_s = idle_seconds() if idle_s is None else idle_s
    results: dict[str, dict[int, Latency]] = {name: {} for name in runners}
    rounds = rounds or max(1, repeats // 4)
    per_round = max(1, repeats // rounds)
    with bar("latency", len(batch_sizes) * len(runners) * rounds if show else 0) as b:
        for bs in batch_sizes:
            x = make_input(bs)
            inputs = {name: prepare_input(r, x) for name, r in runners.items()}
            times: dict[str, list[float]] = {name: [] for name in runners}
            for name, r in runners.items():
                for _ in range(warmup):
                    r(inputs[name])
            for _ in range(rounds):
                for name, r in runners.items():
                    inp = inputs[name]
                    if idle_s and not getattr(r, "cuda_events", False):
                        time.sleep(idle_s)
                    for _ in range(settle):
                        r(inp)
                    for _ in range(per_round):
                        if getattr(r, "cuda_events", False):
                            times[name].append(cuda_time(r, inp))
                            continue
                        t0 = time.perf_counter()
                        r(inp)
                        times[name].append(time.perf_counter() - t0)
                    b.advance()
            for name in runners:
                results[name][bs] = summarize(times[name], bs)
    return results
