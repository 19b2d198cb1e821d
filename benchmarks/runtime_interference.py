"""Does one runtime's thread pool slow the next one down when both are timed in one process?

verify and `deploycraft bench` time every deployable in one process, interleaved (blocks of a few runs
per model in turn). This script measures what that costs OpenVINO: two copies of the run's
INT8-for-OpenVINO file (A and B) timed alone, then with ONNX Runtime's FP32 and INT8 sessions between
them (so B always follows ONNX Runtime), with ONNX Runtime's worker threads allowed to spin after a run
(its default), never, or only inside a run, with a pause of 5 or 50 ms before each block, and with
OpenVINO's thread pinning off; then two ONNX Runtime sessions with torch's eager model between them
(torch's OpenMP pool). If B is slower than A only when the model between them spins, its spinning
threads are taking the cores from the model timed after it. The last configurations are how verify and
`deploycraft bench` time now.

    .venv/bin/python benchmarks/runtime_interference.py RUN_DIR [--batch 1 64] [--threads 2]

Prints one line per configuration: p50 ms of each model at each batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import torch

from deploycraft.runtime import openvino, ort
from deploycraft.runtime.bench import idle_seconds, measure


def ort_session(path: Path, threads: int, spin: bool, stop_after_run: bool = False):
    sess = ort.session(path, threads, spinning=spin, stop_spinning_after_run=stop_after_run)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_request(path: Path, threads: int, pinning: bool | None):
    request = openvino.compile_model(path, threads, "f32", pinning).create_infer_request()

    def run(x):
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    deploy = args.run_dir / "deploy"
    fp32, int8, int8_ov = deploy / "model_fp32.onnx", deploy / "model_int8.onnx", deploy / "model_int8_openvino.onnx"
    for path in (fp32, int8, int8_ov):
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: pass a run folder whose deploy/ has the FP32 and INT8 files")
    graph = onnx.load(str(fp32), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    th = args.threads

    def ort_pair(spin: bool, stop_after_run: bool = False) -> dict:
        return {
            "ORT FP32": ort_session(fp32, th, spin, stop_after_run),
            "ORT INT8": ort_session(int8, th, spin, stop_after_run),
        }

    def ov_pair_around(middle: dict, pinning: bool | None = None) -> dict:
        return {"OV A": ov_request(int8_ov, th, pinning), **middle, "OV B": ov_request(int8_ov, th, pinning)}

    def torch_between() -> dict:
        from deploycraft.models.io import load_model
        from deploycraft.runtime.torch_rt import TorchRunner

        a, b = ort_session(int8, th, True, True), ort_session(int8, th, True, True)
        return {"ORT INT8 A": a, "torch FP32": TorchRunner(load_model(deploy / "torch")), "ORT INT8 B": b}

    idle = idle_seconds()  # as verify would pause
    # (what is timed, seconds of idle before each block): idle 0 shows each interference as it was
    configs = {
        "OpenVINO alone": (lambda: ov_pair_around({}), 0.0),
        "with ONNX Runtime (spinning, its default)": (lambda: ov_pair_around(ort_pair(True)), 0.0),
        "with ONNX Runtime (spinning), 5 ms idle before each block": (lambda: ov_pair_around(ort_pair(True)), 0.005),
        "with ONNX Runtime (spinning), 50 ms idle before each block": (lambda: ov_pair_around(ort_pair(True)), 0.05),
        "with ONNX Runtime, spinning off": (lambda: ov_pair_around(ort_pair(False)), 0.0),
        "with ONNX Runtime, spinning stops when a run returns": (
            lambda: ov_pair_around(ort_pair(True, stop_after_run=True)),
            0.0,
        ),
        "with ONNX Runtime (spinning), OpenVINO unpinned": (lambda: ov_pair_around(ort_pair(True), False), 0.0),
        "ONNX Runtime alone (spinning)": (lambda: ort_pair(True), idle),
        "ONNX Runtime alone, spinning stops when a run returns": (lambda: ort_pair(True, stop_after_run=True), idle),
        f"as verify times them (spinning stops when a run returns, {idle * 1000:.0f} ms idle)": (
            lambda: ov_pair_around(ort_pair(True, stop_after_run=True)),
            idle,
        ),
    }
    if (deploy / "torch").is_dir():
        configs["torch between two ONNX Runtime sessions (its OpenMP pool)"] = (torch_between, 0.0)
        configs[f"torch between, {idle * 1000:.0f} ms idle"] = (torch_between, idle)
    print(f"p50 ms at batch {' / '.join(map(str, args.batch))}, {th} threads, {args.repeats} runs per model")
    for label, (build, idle_s) in configs.items():
        runners = build()
        make_input = lambda bs: torch.rand(bs, *dims[1:])  # noqa: E731
        res = measure(runners, make_input, args.batch, warmup=5, repeats=args.repeats, show=False, idle_s=idle_s)
        cells = "  ".join(f"{k} " + " / ".join(f"{res[k][b].p50:.3f}" for b in args.batch) for k in runners)
        print(f"{label}: {cells}", flush=True)
        del runners
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
