"""`deploycraft bench`: ONNX files timed side by side on ONNX Runtime CPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from deploycraft.errors import UserError
from deploycraft.runtime.bench import measure
from deploycraft.runtime.ort import OrtRunner
from deploycraft.stages.verify import physical_cores


def _input_shape(path: Path) -> tuple[int, ...]:
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "deploycraft.input" in meta:
        spec = json.loads(meta["deploycraft.input"])
        return (spec["channels"], spec["image_size"], spec["image_size"])
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    if not all(d.dim_value for d in dims):
        raise UserError(
            f"{path}: cannot tell the input shape (dynamic dims beyond batch)",
            field="MODEL.onnx",
            fix="export with static C, H, W",
        )
    return tuple(d.dim_value for d in dims)


def bench_onnx(paths: list[Path], batch_sizes: list[int], threads: int | None, repeats: int, warmup: int):
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p} does not exist", field="MODEL.onnx", fix="give paths of .onnx files")
    shapes = {_input_shape(Path(p)) for p in paths}
    if len(shapes) != 1:
        raise UserError(
            f"the models take different inputs {sorted(shapes)}",
            field="MODEL.onnx",
            fix="compare models of one input shape",
        )
    shape = shapes.pop()
    threads = threads or physical_cores()
    runners = {str(p): OrtRunner(Path(p), threads) for p in paths}
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(max(batch_sizes), *shape, generator=gen)
    res = measure(runners, lambda bs: sample[:bs], batch_sizes, warmup, repeats)
    base = str(paths[0])
    lines = [f"ONNX Runtime CPU, {threads} threads, input {shape}, {repeats} interleaved runs"]
    for bs in batch_sizes:
        lines.append(f"batch {bs}:")
        for name in runners:
            lat = res[name][bs]
            ratio = res[base][bs].p50 / lat.p50
            lines.append(
                f"  {name:<48} p50 {lat.p50:8.3f} ms  p99 {lat.p99:8.3f} ms  {lat.throughput_ips:9.0f} img/s"
                f"  {ratio:5.2f}x vs first"
            )
    results = {name: {str(bs): res[name][bs].to_dict() for bs in batch_sizes} for name in runners}
    return "\n".join(lines), {"threads": threads, "input": list(shape), "results": results}
