"""ONNX Runtime sessions on CPU, with the thread count fixed for fair timing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx


def session(
    path: Path,
    threads: int | None = None,
    optimized_path: Path | None = None,
    providers: list[str] | None = None,
    spinning: bool = True,
    stop_spinning_after_run: bool = False,
):
    """``spinning``: ONNX Runtime's default lets its worker threads spin after a run (lower latency alone; in a
    process that times other runtimes too they take the cores from the next model:
    benchmarks/runtime_interference.py). ``stop_spinning_after_run`` keeps the spinning inside a run (between
    its operators, where it pays) and parks the threads when the run returns."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


class OrtRunner:
    """Runs an ONNX file on ONNX Runtime's CPU execution provider.

    Its worker threads spin between the operators of a run and are parked when the run returns: left spinning
    after it (ONNX Runtime's default) they took the cores from the model timed next in the same process
    (OpenVINO 1.3-2x slower at batch 1 on the flagship, the next ONNX Runtime session too), while ONNX Runtime's
    own time alone is the same either way (benchmarks/runtime_interference.py, README)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        self.path = Path(path)
        self.sess = session(self.path, threads, stop_spinning_after_run=True)
        self.input_name = self.sess.get_inputs()[0].name

    def prepare(self, x) -> np.ndarray:
        return np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def optimized_op_counts(path: Path, workdir: Path, threads: int | None = 1) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually executes after its optimizations (QLinearConv etc.)."""
    out = Path(workdir) / (Path(path).stem + ".ort-optimized.onnx")
    session(path, threads, optimized_path=out)
    counts = dict(Counter(n.op_type for n in onnx.load(str(out)).graph.node))
    out.unlink(missing_ok=True)
    return counts
