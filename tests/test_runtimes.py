"""CPU runtimes beside ONNX Runtime (OpenVINO), the proof of INT8 execution per target, the choice of the
fastest deployable (target auto), the ceiling, and `deploycraft bench` on every runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploycraft.data.transforms import InputSpec
from deploycraft.deployables import (
    RUNTIME_TARGET,
    DeployableCheckError,
    QuantSettings,
    build_deployable,
    check_int8_execution,
    int8_execution,
)
from deploycraft.errors import UserError
from deploycraft.onnx_io import quant_dtypes, relative_error
from deploycraft.quant.placement import act_quantizers
from deploycraft.runtime import available
from deploycraft.stages.verify import fastest_fp32, select_fastest
from tests.conftest import run_cli

needs_openvino = pytest.mark.skipif(
    not available("openvino"), reason="openvino is not installed (pip install openvino)"
)
SPEC = InputSpec(16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _calib(n=32):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@needs_openvino
def test_openvino_runs_the_fp32_file_like_onnx_runtime(tmp_path, tiny_resnet):
    from deploycraft.runtime.openvino import OvRunner
    from deploycraft.runtime.ort import OrtRunner

    path = tmp_path / "m.onnx"
    x = torch.randn(4, 3, 16, 16)
    build_deployable(tiny_resnet, "fp32", path, x[:2])
    ort, ov = OrtRunner(path)(x.numpy()), OvRunner(path, threads=1, precision="f32")(x.numpy())
    assert relative_error(ov, ort) < 1e-4
    bf16 = OvRunner(path, threads=1, precision="bf16")(x.numpy())
    assert relative_error(bf16, ort) < 0.1  # bf16 keeps 8 bits of mantissa: close, not equal


@needs_openvino
def test_ctrl_c_after_openvino_models_are_released_is_a_keyboard_interrupt(tmp_path, tiny_resnet):
    """OpenVINO's CPU plugin left the thread an alternate signal stack whose memory it had freed once two
    models were released in the order they were made: the next SIGINT or SIGTERM killed the process with
    SIGSEGV (as after verify). Here, in a child process, it must raise KeyboardInterrupt."""
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    build_deployable(tiny_resnet, "fp32", path, torch.randn(2, 3, 16, 16))
    code = (
        "import gc, signal, sys, threading, time, numpy as np\n"
        # Python's own handler, unblocked: a child inherits its parent's signal mask and dispositions, and a
        # pytest-xdist worker had SIGINT blocked once (the signal stayed pending, the child slept and exited 0)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "from deploycraft.runtime.openvino import OvRunner\n"
        "a = OvRunner(sys.argv[1], threads=1); b = OvRunner(sys.argv[1], threads=1)\n"
        "a(np.zeros((1, 3, 16, 16), np.float32)); del a; gc.collect(); del b; gc.collect()\n"
        "try:\n"
        # to the main thread, whose signal stack the plugin freed (a signal to the process may land on one
        # of OpenVINO's threads, and signal.pause() then waits for ever)
        "    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT); time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted", (proc.returncode, proc.stderr[-500:])


@needs_openvino
@pytest.mark.parametrize("target", ["onnxruntime-cpu", "openvino-cpu"])
def test_every_conv_runs_in_int8_on_its_runtime(tmp_path, tiny_resnet, target):
    path = tmp_path / "q.onnx"
    built = build_deployable(
        tiny_resnet, "int8", path, torch.randn(2, 3, 16, 16), target=target, calibration=(_calib(), SPEC)
    )
    proof = check_int8_execution(path, target, built.module, tmp_path)
    assert proof["int8_convs"] == proof["convs"] == proof["expected_int8_convs"] == 21
    if target == "openvino-cpu":  # symmetric: U8 after ReLU, S8 on the signed tensors (the input, conv outputs)
        assert set(quant_dtypes(built.proto)) == {"uint8", "int8"}
        # OpenVINO's own graph clips without rounding exactly where the simulation does (one per block)
        assert proof["clip_only"]["runtime"] == proof["clip_only"]["simulated"]
        assert len(proof["clip_only"]["runtime"]) == 9


@needs_openvino
def test_openvino_runs_a_residual_block_as_simulated_only_with_its_unrounded_clip(tmp_path):
    """A residual block (16 channels, trained-like BN): OpenVINO's output equals the openvino-cpu simulation on
    every element; rounding at the conv -> add quantizer, as the Q/DQ file literally says, moves thousands
    of them by a step."""
    from deploycraft.models.resnet import BasicBlock
    from deploycraft.quant.modules import rounding_everywhere
    from deploycraft.runtime.openvino import OvRunner
    from tests.conftest import randomize_bn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(16)
            self.block = BasicBlock(16, 16)

        def forward(self, x):
            return self.block(torch.relu(self.bn(self.conv(x)))).flatten(1)

    torch.manual_seed(0)
    net = Net()
    randomize_bn(net)
    path, x = tmp_path / "block.onnx", torch.randn(8, 3, 16, 16)
    built = build_deployable(
        net.eval(), "int8", path, x[:2], target="openvino-cpu", calibration=(_calib(), SPEC)
    )  # fmt: skip
    quantizers = [q for _, q in built.module.named_modules() if hasattr(q, "clip_only_while")]
    clipped = [q for q in quantizers if not q.rounds]
    assert len(clipped) == 1
    step = float(quantizers[-1].scale)
    ov = OvRunner(path, threads=1, precision="f32")(x.numpy())
    with torch.no_grad():
        sim = built.module(x).numpy()
        with rounding_everywhere(quantizers):  # round there too, as the file says
            rounded = built.module(x).numpy()
    assert np.mean(np.abs(ov - sim) > step / 2) < 1e-3
    assert np.mean(np.abs(ov - rounded) > step / 2) > 0.02


@needs_openvino
def test_openvino_placement_compiles_where_the_asymmetric_one_does_not(tmp_path):
    """PyramidNet's zero-padded shortcuts: OpenVINO 2026.4's low-precision passes fail on the asymmetric
    (zero-point) file; the symmetric openvino-cpu placement compiles and runs every conv in INT8."""
    from deploycraft.models import create_model

    torch.manual_seed(0)
    model = create_model("pyramidnet20_a48", num_classes=10, in_chans=1).eval()
    spec = InputSpec(28, 1, (0.5,), (0.25,))
    calib = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "p.onnx"
    built = build_deployable(
        model, "int8", path, torch.randn(2, 1, 28, 28), target="openvino-cpu", calibration=(calib, spec)
    )
    proof = check_int8_execution(path, "openvino-cpu", built.module, tmp_path)
    assert proof["int8_convs"] == proof["convs"] == proof["expected_int8_convs"] == 19


def test_a_file_that_would_run_in_float_is_refused(tmp_path, tiny_resnet, monkeypatch):
    import deploycraft.deployables as dep

    path = tmp_path / "q.onnx"
    built = build_deployable(tiny_resnet, "int8", path, torch.randn(2, 3, 16, 16), calibration=(_calib(), SPEC))
    real = dep.int8_execution

    def fewer(p, target, workdir):
        proof = real(p, target, workdir)
        return {**proof, "int8_convs": proof["int8_convs"] - 3}

    monkeypatch.setattr(dep, "int8_execution", fewer)
    with pytest.raises(DeployableCheckError, match="would run only 18 of the 21 convs .* in float"):
        check_int8_execution(path, "onnxruntime-cpu", built.module, tmp_path)


def _stub(top1: float, p50: dict[str, float]) -> dict:
    return {"top1": top1, "format": "onnx", "precision": "int8", "latency": {b: {"p50": v} for b, v in p50.items()}}


def test_auto_picks_the_fastest_inside_the_budget():
    candidates = {
        "fp32_onnx": _stub(0.90, {"1": 3.0, "64": 60.0}),
        "int8_onnx": _stub(0.895, {"1": 1.2, "64": 30.0}),
        "int8_openvino": _stub(0.897, {"1": 1.3, "64": 20.0}),  # a bit slower at 1, much faster at 64
        "int8_onnx@openvino": _stub(0.70, {"1": 0.5, "64": 10.0}),  # fastest, but outside the budget
    }
    chosen, table = select_fastest(candidates, reference_top1=0.90, budget=0.01, batch_sizes=[1, 64])
    assert chosen == "int8_openvino"
    assert [r["name"] for r in table][:3] == ["int8_openvino", "int8_onnx", "fp32_onnx"]
    assert table[-1]["name"] == "int8_onnx@openvino" and not table[-1]["within_budget"]
    assert sum(r["chosen"] for r in table) == 1
    # geometric mean of p50 / best measured p50 over the batch sizes (best: 0.5 ms at 1, 10 ms at 64)
    assert table[0]["relative_latency"] == pytest.approx(((1.3 / 0.5) * (20 / 10)) ** 0.5, rel=1e-3)
    nothing, _ = select_fastest(candidates, reference_top1=0.99, budget=0.01, batch_sizes=[1, 64])
    assert nothing is None


def test_a_fixed_target_names_a_faster_deployable_inside_the_budget():
    from types import SimpleNamespace

    from deploycraft.report import faster_alternative, faster_here, faster_words
    from deploycraft.stages.verify import VerifyStage

    models = {
        "fp32_torch": {**_stub(0.90, {"1": 9.0, "64": 90.0}), "format": "torch", "precision": "fp32"},
        "fp32_onnx": {**_stub(0.90, {"1": 3.0, "64": 60.0}), "precision": "fp32"},
        "fp32_onnx@openvino-bf16": {**_stub(0.899, {"1": 2.5, "64": 20.0}), "precision": "bf16"},
        "int8_onnx": _stub(0.899, {"1": 2.0, "64": 50.0}),
        "int8_onnx@openvino": _stub(0.80, {"1": 0.5, "64": 5.0}),  # fastest, outside the budget
        "unpruned_fp32_onnx": {**_stub(0.90, {"1": 0.1, "64": 1.0}), "precision": "fp32"},  # not a deployable
    }
    faster = faster_alternative(models, "int8_onnx", 0.90, 0.01, [1, 64])
    assert faster["name"] == "fp32_onnx@openvino-bf16"
    assert faster["speedup_over_shipped"] == {"1": 0.8, "64": 2.5}  # slower at batch 1, faster overall
    assert faster["speedup_over_shipped_overall"] == pytest.approx((0.8 * 2.5) ** 0.5, rel=1e-3)
    # the shipped one is the fastest inside the budget, or the other is faster only within the margin: no note
    assert faster_alternative(models, "fp32_onnx@openvino-bf16", 0.90, 0.01, [1, 64]) is None
    near = {**models, "fp32_onnx@openvino-bf16": {**_stub(0.899, {"1": 1.9, "64": 47.0}), "precision": "bf16"}}
    assert faster_alternative(near, "int8_onnx", 0.90, 0.01, [1, 64]) is None
    # without a budget everything is inside it, and the sentence says no budget was set
    unbounded = faster_alternative(models, "int8_onnx", 0.90, None, [1, 64])
    assert unbounded["name"] == "int8_onnx@openvino"

    verify = {"models": models, "main": "int8_onnx", "reference": "fp32_torch", "batch_sizes": [1, 64]}

    def recipe(target, budget=0.01):
        return SimpleNamespace(
            target=target, stages=[SimpleNamespace(type="verify", enabled=True, max_accuracy_drop=budget)]
        )

    assert faster_here(recipe("onnxruntime-cpu"), verify) == faster
    assert faster_here(recipe("auto"), verify) is None  # auto already ships the fastest
    assert faster_here(recipe("tensorrt"), verify) is None  # its files run on a GPU, not where they were timed
    report = {"main": "int8_onnx", "target": "onnxruntime-cpu", "faster_alternative": faster}
    text = "\n".join(VerifyStage.report_section({"models": {}, "headline": [], "gates": [], **report}))
    assert (
        "**Faster here: FP32 ONNX on OpenVINO, bf16** (89.90 %, drop +0.10 pt, inside the 1.00-point budget) runs "
        "1.25× slower at batch 1 and 2.50× faster at batch 64 than the shipped INT8 ONNX (1.41× over the batch "
        "sizes, geometric mean). The recipe's fixed `target: onnxruntime-cpu` ships the latter" in text
    )
    words = faster_words({**report, "faster_alternative": faster_here(recipe("onnxruntime-cpu", None), verify)})
    assert "(80.00 %, drop +10.00 pt, no accuracy budget set) runs 4.00× faster at batch 1 and 10.00× faster" in words


def test_fastest_fp32_ignores_int8_and_unpruned_rows():
    models = {
        "fp32_onnx": {**_stub(0.9, {"1": 3.0}), "precision": "fp32"},
        "fp32_onnx@openvino": {**_stub(0.9, {"1": 2.0}), "precision": "fp32"},
        "fp32_onnx@openvino-bf16": {**_stub(0.9, {"1": 1.0}), "precision": "bf16"},
        "unpruned_fp32_onnx": {**_stub(0.9, {"1": 0.5}), "precision": "fp32"},
        "int8_onnx": _stub(0.9, {"1": 0.4}),
    }
    assert fastest_fp32(models, [1]) == {"1": "fp32_onnx@openvino"}
    assert fastest_fp32(models, [1], ("fp32", "bf16")) == {"1": "fp32_onnx@openvino-bf16"}


def test_headline_names_both_fp32_references():
    from deploycraft.report import headline
    from deploycraft.stages.verify import VerifyStage

    lat = {"1": {"p50": 1.0}}
    models = {
        "int8_openvino": {"latency_by_batch": lat},
        "fp32_onnx": {"latency_by_batch": {"1": {"p50": 3.0}}},
        "fp32_onnx@openvino-bf16": {"latency_by_batch": {"1": {"p50": 2.0}}},
        "fp32_torch": {"latency_by_batch": {"1": {"p50": 8.0}}},
    }
    rows = headline(models, "int8_openvino", {"1": "fp32_onnx"}, {"1": "fp32_onnx@openvino-bf16"})
    assert rows[0]["speedup_vs_fastest_fp32"] == 3.0
    assert rows[0]["speedup_vs_fastest_fp32_file"] == 2.0
    assert rows[0]["speedup_vs_fp32_torch"] == 8.0
    text = "\n".join(VerifyStage.report_section({"models": {}, "headline": rows, "gates": []}))
    assert "3.00× faster than the fastest FP32 runtime" in text and ": 2.00×." in text


@needs_openvino
def test_bench_times_files_on_every_runtime_and_the_ceiling(tmp_path, tiny_resnet):
    path = tmp_path / "m.onnx"
    build_deployable(
        tiny_resnet, "fp32", path, torch.randn(2, 3, 16, 16), metadata={"deploycraft.input": SPEC.to_dict()}
    )
    out = tmp_path / "bench.json"
    proc = run_cli("bench", path, "--batch", "2", "--repeats", "6", "--warmup", "1", "--peak", "--json", out)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {f"{path} @onnxruntime", f"{path} @openvino"}
    assert set(results["ceiling"]) >= {"onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:int8"}
    assert all(c["gmacs"] > 1 for c in results["ceiling"].values())


def test_plot_keeps_small_differences_small(tmp_path):
    from deploycraft.report import MIN_TOP1_SPAN, plot_accuracy_latency, top1_axis

    lo, hi = top1_axis([91.00, 90.97])
    assert hi - lo >= MIN_TOP1_SPAN and lo < 90.97 and hi > 91.0  # 0.03 points stay 0.03 points of a >= 2-point axis
    assert top1_axis([0.0, 0.5])[0] == 0.0 and top1_axis([99.9, 100.0])[1] == 100.0  # never outside [0, 100]
    models = {
        n: {"top1": t, "latency_ms": {"p50": p}, "batch_size": 1, "backend": "onnxruntime", "precision": "int8"}
        for n, t, p in (("fp32_onnx", 0.9100, 2.0), ("int8_onnx", 0.9097, 1.0))
    }
    assert plot_accuracy_latency({"recipe": "r", "models": models, "main": "int8_onnx"}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_plot_numbers_stay_clear_of_markers_and_each_other():
    """The flagship's stop-29 points (ms at batch 1, top-1 %): two files within 0.01 ms and 0.02 points share
    a number label; no label covers a marker or another label or leaves the frame (it did: "6" and "7" were
    drawn on top of each other, "4" under the next marker)."""
    from deploycraft import report as rep

    ms = [8.576, 1.992, 2.232, 0.970, 1.088, 0.528, 0.526, 1.114]
    top1 = [86.50, 86.50, 86.50, 86.46, 86.53, 86.47, 86.45, 86.33]
    width, height = rep.FRAME_PT
    at = rep.frame_positions(ms, top1, (min(ms) / 1.4, max(ms) * 1.4), rep.top1_axis(top1))  # the plot's limits
    assert at[1][1] == at[2][1] and at[0][0] > at[2][0] > at[1][0]  # same top-1, same height; slower, further right
    layout = rep.label_layout(at, width, height)
    assert [t for t, _, _ in layout] == ["1", "2", "3", "4", "5", "6, 7", "8"]
    r = rep._MARKER_R

    def box(points, text, i, d):
        x, y = points[i][0] + d[0], points[i][1] + d[1]
        return (x, y, x + rep._DIGIT_W * len(text), y + rep._LABEL_H)

    def overlap(a, b):  # written out here, not the module's own helper
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    markers = [(x - r, y - r, x + r, y + r) for x, y in at]
    boxes = [box(at, *label) for label in layout]
    for k, b in enumerate(boxes):
        assert 0 <= b[0] and 0 <= b[1] and b[2] <= width and b[3] <= height
        assert not any(overlap(b, m) for m in markers), layout[k]
        assert not any(overlap(b, other) for j, other in enumerate(boxes) if j != k), layout[k]
    # crowded: a long shared label goes further out rather than over a neighbour's marker
    crowd = [(40.0, 100.0), (43.0, 100.0), (47.0, 101.0), (70.0, 106.0), (60.0, 93.0), (40.0, 112.0)]
    first, *_ = rep.label_layout(crowd, width, height)
    assert first[0] == "1, 2, 3"
    assert not any(overlap(box(crowd, *first), (x - r, y - r, x + r, y + r)) for x, y in crowd)


def test_symmetric_int8_matches_its_simulation_on_onnx_runtime(tmp_path, tiny_resnet):
    """The OpenVINO placement is plain QDQ: ONNX Runtime runs it too, and computes what torch simulates."""
    path = tmp_path / "q.onnx"
    built = build_deployable(
        tiny_resnet,
        "int8",
        path,
        torch.randn(2, 3, 16, 16),
        target="openvino-cpu",
        settings=QuantSettings(calibrator="max", percentile=100.0),
        calibration=(_calib(), SPEC),
    )
    from deploycraft.runtime.ort import OrtRunner

    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        sim = built.module(x).numpy()
    out = OrtRunner(path)(x.numpy())
    assert relative_error(out, sim) < 0.1 and np.mean(out.argmax(1) == sim.argmax(1)) >= 0.75


def test_headline_says_slower_when_the_shipped_file_is():
    from deploycraft.report import headline
    from deploycraft.stages.verify import VerifyStage

    models = {
        "int8_onnx": {"latency_by_batch": {"1": {"p50": 4.0}}},
        "fp32_onnx": {"latency_by_batch": {"1": {"p50": 1.0}}},
        "fp32_torch": {"latency_by_batch": {"1": {"p50": 8.0}}},
    }
    rows = headline(models, "int8_onnx", {"1": "fp32_onnx"}, {"1": "fp32_onnx"})
    text = "\n".join(VerifyStage.report_section({"models": {}, "headline": rows, "gates": []}))
    assert "4.00× slower than the fastest FP32 runtime" in text and "2.00× faster than FP32 torch" in text


def _relu_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnxruntime_spinning_can_be_turned_off(tmp_path):
    """benchmarks/runtime_interference.py times ONNX Runtime with its worker threads spinning (its default) or not."""
    from deploycraft.runtime.ort import session

    path = _relu_file(tmp_path)
    key = "session.intra_op.allow_spinning"
    assert session(path, 1, spinning=False).get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left at ONNX Runtime's default
        session(path, 1).get_session_options().get_session_config_entry(key)


def test_onnxruntime_runner_parks_its_threads_when_a_run_returns(tmp_path):
    """verify and bench time every runtime in one process: the runner's spinning threads must not outlive its run."""
    from deploycraft.runtime.ort import OrtRunner

    options = OrtRunner(_relu_file(tmp_path), 1).sess.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # spinning inside a run stays on
        options.get_session_config_entry("session.intra_op.allow_spinning")


def test_each_cpu_block_starts_after_the_machine_went_idle(monkeypatch):
    """measure sleeps before every CPU model's block (the previous model's spinning threads park), never
    inside the timed runs, and not before GPU runners timed by CUDA events."""
    from deploycraft.runtime import bench

    events: list[str] = []

    class Cpu:
        def __init__(self, name):
            self.name = name

        def __call__(self, x):
            events.append(self.name)

    class Gpu(Cpu):
        cuda_events = True

    monkeypatch.delenv(bench.IDLE_ENV, raising=False)  # the default pause (the suite turns it off)
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(f"idle {s}"))
    monkeypatch.setattr(bench, "cuda_time", lambda r, x: (r(x), 0.001)[1])
    runners = {"a": Cpu("a"), "b": Cpu("b"), "g": Gpu("g")}
    bench.measure(runners, lambda bs: torch.zeros(bs, 1), [1], warmup=0, repeats=4, rounds=2, show=False)
    block = [f"idle {bench.IDLE_S}", "a", "a", "a", f"idle {bench.IDLE_S}", "b", "b", "b", "g", "g", "g"]
    assert events == block * 2  # idle, settle run, two timed runs; the GPU runner without the idle wait
    events.clear()
    bench.measure(runners, lambda bs: torch.zeros(bs, 1), [1], warmup=0, repeats=2, rounds=1, show=False, idle_s=0)
    assert not [e for e in events if e.startswith("idle")]
    monkeypatch.setenv(bench.IDLE_ENV, "0.2")
    events.clear()
    bench.measure({"a": Cpu("a")}, lambda bs: torch.zeros(bs, 1), [1], warmup=0, repeats=1, rounds=1, show=False)
    assert events == ["idle 0.2", "a", "a"]
    monkeypatch.setenv(bench.IDLE_ENV, "soon")
    with pytest.raises(UserError, match="DEPLOYCRAFT_BENCH_IDLE_S is 'soon'"):
        bench.measure({"a": Cpu("a")}, lambda bs: torch.zeros(bs, 1), [1], warmup=0, repeats=1, show=False)


def test_the_report_says_when_the_shipped_int8_file_runs_on_a_runtime_it_was_not_placed_for():
    from deploycraft.stages.verify import _placed_elsewhere

    models = {
        "int8_onnx": {"precision": "int8", "backend": "onnxruntime", "target": "onnxruntime-cpu"},
        "int8_onnx@openvino": {
            "precision": "int8",
            "backend": "openvino",
            "target": "onnxruntime-cpu",
            "simulation_agreement": 0.9984,
        },
        "int8_openvino": {"precision": "int8", "backend": "openvino", "target": "openvino-cpu"},
        "fp32_onnx@openvino": {"precision": "fp32", "backend": "openvino", "target": None},
    }
    line = "\n".join(_placed_elsewhere({"models": models, "main": "int8_onnx@openvino"}))
    assert "**Shipped on a runtime it was not placed for**: INT8 ONNX on OpenVINO is the file placed for " in line
    assert "onnxruntime-cpu, run by OpenVINO; the quantize stage compared it there with its simulation" in line
    assert "top-1 agreement 99.84 % on the held-out split" in line
    for native in ("int8_onnx", "int8_openvino", "fp32_onnx@openvino"):
        assert _placed_elsewhere({"models": models, "main": native}) == []


def test_auto_ships_a_file_on_another_runtime_only_where_its_simulation_was_compared_there():
    """verify's simulation_check reads the quantize stage's comparisons: a file on its own runtime may ship; on
    the other runtime only where the quantize stage compared it there and found no shortfall; such a row is
    measured and listed, never chosen, even when it is the fastest inside the budget."""
    from deploycraft.stages.verify import simulation_check

    quantize = {
        "targets": {
            "onnxruntime-cpu": {
                "runtime": "onnxruntime",
                "held_out": {"sim_vs_deployed": 1.0},
                "other_runtimes": {"openvino": {"held_out": {"sim_vs_deployed": 0.9984}, "shortfalls": []}},
            },
            "openvino-cpu": {"runtime": "openvino", "held_out": {"sim_vs_deployed": 0.9988}},
        }
    }
    row = {"format": "onnx", "precision": "int8"}
    assert simulation_check(quantize, {**row, "backend": "onnxruntime", "target": "onnxruntime-cpu"}) == (1.0, None)
    assert simulation_check(quantize, {**row, "backend": "openvino", "target": "onnxruntime-cpu"}) == (0.9984, None)
    agreement, why = simulation_check(quantize, {**row, "backend": "onnxruntime", "target": "openvino-cpu"})
    assert agreement is None and "not compared with it on ONNX Runtime" in why
    short = {"held_out": {"sim_vs_deployed": 0.97}, "shortfalls": ["openvino runs 20 of 21 convs in INT8"]}
    quantize["targets"]["onnxruntime-cpu"]["other_runtimes"]["openvino"] = short
    assert simulation_check(quantize, {**row, "backend": "openvino", "target": "onnxruntime-cpu"}) == (
        0.97,
        "openvino runs 20 of 21 convs in INT8",
    )
    assert simulation_check(quantize, {"format": "onnx", "precision": "fp32", "backend": "openvino"}) == (None, None)

    candidates = {
        "int8_onnx": _stub(0.895, {"1": 1.2, "64": 30.0}),
        "int8_openvino": _stub(0.897, {"1": 1.3, "64": 20.0}),
        "int8_openvino@onnxruntime": {**_stub(0.899, {"1": 0.5, "64": 10.0}), "not_shippable": "not compared"},
    }
    chosen, table = select_fastest(candidates, reference_top1=0.90, budget=0.01, batch_sizes=[1, 64])
    assert chosen == "int8_openvino"
    barred = next(r for r in table if r["name"] == "int8_openvino@onnxruntime")
    assert barred["within_budget"] and barred["not_shippable"] == "not compared" and not barred["chosen"]
    assert table[-1] is barred  # listed after every eligible one; latencies still relative to the fastest measured
    assert table[0]["relative_latency"] == pytest.approx(((1.3 / 0.5) * (20 / 10)) ** 0.5, rel=1e-3)


@needs_openvino
@pytest.mark.parametrize("target", ["onnxruntime-cpu", "openvino-cpu"])
def test_a_file_on_the_other_cpu_runtime_computes_its_simulation_fused_as_that_runtime(tmp_path, tiny_resnet, target):
    """The file placed for one CPU runtime, run by the other: the float64 simulation fused and rounded as that
    runtime runs it (placement.fused_as) follows it; the simulation as placed does not (the other runtime's
    fusions: OpenVINO clips at the fused residual adds without rounding; ONNX Runtime rounds there, and turns
    the int8 tensors into uint8 before fusing them)."""
    from deploycraft.quant.modules import exact_simulation
    from deploycraft.quant.placement import fused_as
    from deploycraft.runtime import onnx_runner

    other = "openvino" if target == "onnxruntime-cpu" else "onnxruntime"
    path = tmp_path / "q.onnx"
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    built = build_deployable(tiny_resnet, "int8", path, x[:2], target=target, calibration=(_calib(), SPEC))
    deployed = onnx_runner(other, path, threads=1)(x.numpy())
    with torch.no_grad():
        fused = exact_simulation(fused_as(built.module, other), other)(x.double()).numpy()
        placed = exact_simulation(built.module, other)(x.double()).numpy()
    if other == "onnxruntime":  # ONNX Runtime's kernels are imitated: equal but for float32 rounding
        assert np.abs(deployed - fused).max() < 1e-4
    else:  # OpenVINO's own float32 steps are not imitated: close, the same class on every image
        assert (deployed.argmax(1) == fused.argmax(1)).all()
    assert np.abs(deployed - placed).mean() > 10 * np.abs(deployed - fused).mean()
    proof = int8_execution(path, RUNTIME_TARGET[other], tmp_path)
    assert proof["int8_convs"] == proof["convs"] == 21  # every conv in INT8 there too
    if other == "openvino":  # it clips where the fused simulation does
        as_run = fused_as(built.module, other)
        assert proof["clip_only"] == sorted(n for n, q in act_quantizers(as_run) if not q.rounds)


def test_onnx_runtime_fuses_an_int8_tensor_only_where_it_has_one_consumer(tmp_path, tiny_resnet):
    """ONNX Runtime turns an int8 Q/DQ pair into uint8 (and fuses it) only where the QuantizeLinear feeds one
    DequantizeLinear: the tensorrt placement's block inputs are read by two convs (or a conv and the add), so
    no conv of its file becomes a QLinearConv on ONNX Runtime, which the count for a file placed elsewhere
    (fused_only) predicts and the plain count does not."""
    from deploycraft.quant.placement import expected_int8_convs

    path = tmp_path / "trt.onnx"
    built = build_deployable(
        tiny_resnet, "int8", path, torch.randn(2, 3, 16, 16), target="tensorrt", calibration=(_calib(), SPEC)
    )
    ran = int8_execution(path, "onnxruntime-cpu", tmp_path)["int8_convs"]
    assert ran == expected_int8_convs(built.module, "onnxruntime-cpu", fused_only=True) == 0
    assert expected_int8_convs(built.module, "onnxruntime-cpu") > 0


def test_a_runtime_that_cannot_run_the_other_file_leaves_that_pairing_out_not_the_file():
    from deploycraft.stages.quantize import _elsewhere_lines

    lines = _elsewhere_lines(
        "onnxruntime-cpu", "openvino", {"runtime": "openvino", "error": "shapes", "shortfalls": ["x"]}
    )
    assert lines == ["The onnxruntime-cpu file on openvino was not compared with its simulation there: shapes."]
