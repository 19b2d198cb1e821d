"""Does one runtime's thread pool slow the next one down when both are timed in one process?

verify and `deploycraft bench` time every deployable in one process, interleaved (blocks of a few runs
per model in turn). This script measures what that costs OpenVINO: two copies of the run's
INT8-for-OpenVINO file (A and B) timed alone, then with ONNX Runtime's FP32 and INT8 sessions between
them (so B always follows ONNX Runtime), with ONNX Runtime's worker threads allowed to spin after a run
(its default) or not, and with OpenVINO's thread pinning off. If B is slower than A only when ONNX
Runtime spins, its spinning threads are taking the cores from the model timed after it.

    .venv/bin/python benchmarks/runtime_interference.py RUN_DIR [--batch 1 64] [--threads 2]

Prints one line per configuration: p50 ms of each model at each batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import torch

from deploycraft.runtime import openvino, ort
from deploycraft.runtime.bench import measure


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

    configs = {
        "OpenVINO alone": lambda: {"OV A": ov_request(int8_ov, th, None), "OV B": ov_request(int8_ov, th, None)},
        "with ONNX Runtime (spinning, its default)": lambda: {
            "OV A": ov_request(int8_ov, th, None),
            **ort_pair(True),
            "OV B": ov_request(int8_ov, th, None),
        },
        "with ONNX Runtime, spinning off": lambda: {
            "OV A": ov_request(int8_ov, th, None),
            **ort_pair(False),
            "OV B": ov_request(int8_ov, th, None),
        },
        "with ONNX Runtime, spinning stops when a run returns": lambda: {
            "OV A": ov_request(int8_ov, th, None),
            **ort_pair(True, stop_after_run=True),
            "OV B": ov_request(int8_ov, th, None),
        },
        "ONNX Runtime alone (spinning)": lambda: ort_pair(True),
        "ONNX Runtime alone, spinning stops when a run returns": lambda: ort_pair(True, stop_after_run=True),
        "with ONNX Runtime (spinning), OpenVINO unpinned": lambda: {
            "OV A": ov_request(int8_ov, th, False),
            **ort_pair(True),
            "OV B": ov_request(int8_ov, th, False),
        },
    }
    print(f"p50 ms at batch {' / '.join(map(str, args.batch))}, {th} threads, {args.repeats} runs per model")
    for label, build in configs.items():
        runners = build()
        make_input = lambda bs: torch.rand(bs, *dims[1:])  # noqa: E731
        res = measure(runners, make_input, args.batch, warmup=5, repeats=args.repeats, show=False)
        cells = "  ".join(f"{k} " + " / ".join(f"{res[k][b].p50:.3f}" for b in args.batch) for k in runners)
        print(f"{label}: {cells}", flush=True)
        del runners
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
