"""The torch model on a CUDA GPU the way it runs fast there: FP16 or BF16 weights and activations,
channels_last (NHWC, what tensor-core convolutions read), cuDNN autotuning, and the whole forward pass
replayed as one CUDA graph per input shape (no per-kernel launch cost: small models at batch 1 are
launch-bound on a GPU). Timed by CUDA events (bench.cuda_time); not executed on the development
machine (no GPU), its tests carry the ``gpu`` marker.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CudaRunner:
    """FP32 in (any device), FP32 logits out on the GPU; ``precision`` and channels_last inside."""

    backend = "torch-cuda"
    cuda_events = True

    def __init__(
        self, model: torch.nn.Module, precision: str = "fp16", channels_last: bool = True, cuda_graph: bool = True
    ):
        torch.backends.cudnn.benchmark = True  # fixed shapes per batch size: let cuDNN pick the fastest kernels
        self.dtype, self.precision = DTYPES[precision], precision
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to("cuda", self.dtype).to(memory_format=self.format)
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to("cuda", torch.float32, non_blocking=True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype).contiguous(memory_format=self.format)).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            with torch.inference_mode():
                out = self._forward(x)
        else:
            out = replay(self.graphs, self._forward, x)
        torch.cuda.synchronize()
        return out


def capture(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``forward`` on a tensor shaped like ``x`` recorded as one CUDA graph: (graph, static input, static output)."""
    static_in = torch.empty_like(x)
    static_in.copy_(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm-up outside the graph: cuDNN autotuning and allocations happen here
            forward(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = forward(static_in)
    return graph, static_in, static_out


def replay(graphs: dict, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``forward(x)`` by replaying the graph captured for x's shape (captured on first use, kept in ``graphs``)."""
    key = tuple(x.shape)
    if key not in graphs:
        graphs[key] = capture(forward, x)
    graph, static_in, static_out = graphs[key]
    static_in.copy_(x)
    graph.replay()
    return static_out.clone()  # the next replay overwrites static_out
