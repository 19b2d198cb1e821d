"""`deploycraft bench`: ONNX files timed side by side on every CPU runtime, AOTInductor packages (.pt2) on
the device they were compiled for (CUDA events on a GPU), and the machine's ceiling.

``--json FILE`` is checked before anything is timed (``check_json_output``): a folder is refused, a missing
folder above the file is created, and an existing file is replaced only when an earlier `deploycraft bench`
wrote it (its ``written_by`` says so; files from before the mark are known by their keys)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from deploycraft.artifacts import write_json
from deploycraft.errors import UserError
from deploycraft.outputs import WRITTEN_BY, check_output_file, owned_json, write_error
from deploycraft.runtime import CPU_RUNTIMES, available, cpu_runtimes, onnx_runner
from deploycraft.runtime.bench import measure, physical_cores

WRITER = "deploycraft bench"
RESULT_KEYS = {"threads", "runtimes", "input", "results", "ceiling"}  # what bench_onnx returns


def check_json_output(path: Path) -> None:
    """``--json``: a new file (missing folders above it are created) or one an earlier `deploycraft bench`
    wrote, in a folder that can be written; checked before the timing, so no result is lost to it."""
    check_output_file(path, "--json", WRITER, lambda p: owned_json(p, WRITER, _earlier_results), example="bench.json")


def _earlier_results(obj: dict) -> bool:
    """A results file bench wrote before it was marked: only its keys, threads among them, and runtimes or
    results (the earliest versions wrote no runtimes list)."""
    keys = set(obj)
    return (
        "threads" in keys
        and bool(keys & {"runtimes", "results"})
        and keys <= RESULT_KEYS
        and isinstance(obj.get("runtimes", []), list)
    )


def write_results(path: Path, results: dict) -> None:
    """The results as JSON, marked as bench's own; a failure is one UserError (the timings are printed)."""
    try:
        write_json(Path(path), {WRITTEN_BY: WRITER, **results})
    except OSError as exc:
        raise write_error(path, exc, "--json", "; the timings are printed above") from None


def _load(path: Path) -> onnx.ModelProto:
    """The ONNX file's graph, or one UserError saying why it is not a usable ONNX file."""
    if path.is_dir():
        raise UserError(f"{path} is a directory", field="MODEL.onnx", fix="give paths of .onnx files")
    if not path.is_file():
        raise UserError(f"{path} does not exist", field="MODEL.onnx", fix="give paths of .onnx files")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes)", field="MODEL.onnx", fix="export the model again")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors, truncation, checker failures
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"{path} is not a valid ONNX model ({exc.__class__.__name__}{': ' + first if first else ''})",
            field="MODEL.onnx",
            fix="give an .onnx file written by an ONNX exporter (a truncated copy will not load)",
        ) from None
    if not proto.graph.input:
        raise UserError(f"{path} has no graph input", field="MODEL.onnx", fix="give a model that takes an image batch")
    return proto


def _input_shape(path: Path, proto: onnx.ModelProto) -> tuple[int, ...]:
    meta = {p.key: p.value for p in proto.metadata_props}
    if "deploycraft.input" in meta:
        try:
            spec = json.loads(meta["deploycraft.input"])
            return (int(spec["channels"]), int(spec["image_size"]), int(spec["image_size"]))
        except (ValueError, KeyError, TypeError):
            pass  # not our metadata after all: read the graph's input shape
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    if not all(d.dim_value for d in dims):
        raise UserError(
            f"{path}: cannot tell the input shape (dynamic dims beyond batch)",
            field="MODEL.onnx",
            fix="export with static C, H, W",
        )
    return tuple(d.dim_value for d in dims)


def _check_batch(path: Path, proto: onnx.ModelProto, batch_sizes: list[int]) -> None:
    """A graph exported with a fixed batch runs that batch size only: one line naming it, before timing."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    other = next((b for b in batch_sizes if fixed and b != fixed), None)
    if other is not None:
        raise UserError(
            f"{path} has its batch fixed at {fixed} (its input is {'x'.join(str(d.dim_value) for d in dims)}), "
            f"so it cannot run batch {other}",
            field="--batch",
            fix=f"give --batch {fixed} (the default is --batch 1), or export the model with a dynamic batch dimension",
        )


def _package_shape(path: Path) -> tuple[int, ...]:
    """The input shape an AOTInductor package of ours records (deploycraft.input in its metadata)."""
    import zipfile

    if not path.is_file() or not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an AOTInductor package", field="MODEL", fix="give a .pt2 file export wrote")
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith("_metadata.json") and "/aotinductor/" in name:
                meta = json.loads(zf.read(name))
                if "deploycraft.input" in meta:
                    spec = json.loads(meta["deploycraft.input"])
                    return (int(spec["channels"]), int(spec["image_size"]), int(spec["image_size"]))
    raise UserError(
        f"{path} does not record its input shape", field="MODEL", fix="give a .pt2 package written by deploycraft"
    )


def bench_onnx(
    paths: list[Path],
    batch_sizes: list[int],
    threads: int | None,
    repeats: int,
    warmup: int,
    runtimes: list[str] | None = None,
    peak: bool = False,
):
    """Every file on every requested runtime, timed interleaved in one process; optionally the ceiling."""
    for name, value, least in (("--repeats", repeats, 1), ("--warmup", warmup, 0), ("--threads", threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} is {value}", field=name, fix=f"give an integer >= {least}")
    bad = [b for b in batch_sizes if b < 1]
    if bad:
        raise UserError(f"--batch {bad[0]} is not a batch size", field="--batch", fix="give batch sizes >= 1")
    runtimes = runtimes or cpu_runtimes()
    for r in runtimes:
        if r not in CPU_RUNTIMES:
            raise UserError(f"unknown runtime {r!r}", field="--runtime", fix=f"use one of {', '.join(CPU_RUNTIMES)}")
        if not available(r):
            raise UserError(f"{r} is not installed", field="--runtime", fix=f"pip install {r}, or leave it out")
    if not paths and not peak:
        raise UserError("nothing to time", field="MODEL.onnx", fix="give .onnx files, or --peak for the ceiling")
    threads = threads or physical_cores()
    text: list[str] = []
    out: dict = {"threads": threads, "runtimes": runtimes}
    packages = [Path(p) for p in paths if str(p).endswith(".pt2")]
    paths = [p for p in paths if not str(p).endswith(".pt2")]
    if paths or packages:
        protos = {Path(p): _load(Path(p)) for p in paths}
        shapes = {_input_shape(p, proto) for p, proto in protos.items()} | {_package_shape(p) for p in packages}
        if len(shapes) != 1:
            raise UserError(
                f"the models take different inputs {sorted(shapes)}",
                field="MODEL.onnx",
                fix="compare models of one input shape",
            )
        shape = shapes.pop()
        for p, proto in protos.items():
            _check_batch(p, proto, batch_sizes)
        runners = {}
        for p in paths:
            for r in runtimes:
                try:
                    runners[f"{p} @{r}"] = onnx_runner(r, Path(p), threads)
                except Exception as exc:  # noqa: BLE001 - the runtime refuses the graph: the user's file
                    first = (str(exc).strip().splitlines() or [""])[0][:160]
                    raise UserError(
                        f"{r} cannot load {p} ({first})", field="MODEL.onnx", fix="check the model with onnx.checker"
                    ) from None
        for p in packages:
            from deploycraft.runtime.aoti import AotiRunner

            runner = AotiRunner(p)
            runners[f"{p} @{runner.backend}:{runner.device}"] = runner
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(max(batch_sizes), *shape, generator=gen)
        try:
            res = measure(runners, lambda bs: sample[:bs], batch_sizes, warmup, repeats)
        except Exception as exc:  # noqa: BLE001 - a runtime rejects the input the graph declares
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise UserError(
                f"a runtime failed to run the models on input {shape} ({first})",
                field="MODEL.onnx",
                fix="give image classifiers with one NCHW float input",
            ) from None
        base = next(iter(runners))
        text.append(f"{', '.join(runtimes)} on the CPU, {threads} threads, input {shape}, {repeats} interleaved runs")
        for bs in batch_sizes:
            text.append(f"batch {bs}:")
            for name in runners:
                lat = res[name][bs]
                ratio = res[base][bs].p50 / lat.p50
                text.append(
                    f"  {name:<56} p50 {lat.p50:8.3f} ms  p99 {lat.p99:8.3f} ms  {lat.throughput_ips:9.0f} img/s"
                    f"  {ratio:5.2f}x vs first"
                )
        out["input"] = list(shape)
        out["results"] = {name: {str(bs): res[name][bs].to_dict() for bs in batch_sizes} for name in runners}
    if peak:
        from deploycraft.ceiling import measure_ceiling

        ceiling = measure_ceiling(runtimes, threads, repeats=max(repeats // 3, 10))
        text.append(f"ceiling ({next(iter(ceiling.values()))['shape']}), {threads} threads:")
        for name, c in ceiling.items():
            text.append(f"  {name:<20} {c['gmacs']:8.1f} GMAC/s  (p50 {c['p50_ms']:.3f} ms)")
        out["ceiling"] = ceiling
    return "\n".join(text), out
