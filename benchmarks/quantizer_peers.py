"""deploycraft's deployables against the peers' INT8 models of the same FP32 ONNX, on every CPU runtime.

Takes a finished run folder. From its FP32 file (deploy/model_fp32.onnx) and the same calibration
images the run used (the recipe's data, its calibration sample), it builds:
- NNCF's default post-training quantization (`nncf.quantize`, 300 samples by default; here the same
  512 images), run on OpenVINO and on ONNX Runtime;
- ONNX Runtime's own static quantizer (`quant_pre_process`, then `quantize_static`: QDQ, per-channel
  S8 weights, U8 activations, MinMax and percentile 99.99 calibration), run on ONNX Runtime;
and measures, interleaved in one process, top-1 on the held-out split and p50 latency at batch 1 and
64 of those, of deploycraft's INT8 files on both runtimes, of the FP32 file on both runtimes (and in
bf16 on OpenVINO where the CPU has bf16 units), and of the deployable the run shipped
(deploy/deployable.json). Latency is timed in rounds (every model in turn, four runs each, in a fresh
seeded order each round); the table's
p50 is the median of the rounds' p50s, and every comparison is paired: the median over rounds of one
model's p50 over the other's in the same round, which holds when the machine's speed changes between
rounds. It prints the table, whether the shipped deployable is at least as fast as NNCF-on-OpenVINO at
both batch sizes (within 3 %) with at least its top-1, and whether it is the fastest of the candidates
`target: auto` chooses from (the FP32 file and deploycraft's INT8 files on every runtime, inside the
recipe's accuracy budget), scored as verify scores them, within 3 %. Top-1 against NNCF is also compared
image by image: how many held-out images only one of the two gets right, and the exact two-sided McNemar
p-value of that split (a difference of a few images is the calibration's luck, not a better method);
``--train-images N`` repeats the comparison on N further images of the training split (a class-balanced
seeded sample, with the calibration images in it at most as 512 of 60,000). The shipped deployable is also timed
against the same file on the same runtime in a session of its own (A/A): how far that paired ratio is
from 1 is how much this machine's noise the comparisons carry.

    .venv/bin/python benchmarks/quantizer_peers.py RUN_DIR [--images 10000] [--json out.json]

NNCF is an optional dependency of this script only: `pip install nncf` (or `.[peers]`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from deploycraft.data import build_data
from deploycraft.data.transforms import prepare_batch
from deploycraft.evaluate import top1
from deploycraft.recipe import build_recipe
from deploycraft.runtime import available, onnx_runner
from deploycraft.runtime.bench import measure, physical_cores

TOLERANCE = 0.03  # "as fast as": within 3 % of p50


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Paired top-1 of two models on the same images: the images only one gets right, and the exact
    two-sided McNemar p-value (binomial, half and half under the hypothesis that neither is better)."""
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"images": int(len(right_a)), "only_first_right": only_a, "only_second_right": only_b, "p_value": p}


def right_on(runner, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Per image, whether ``runner`` classifies it correctly (images already prepared)."""
    out = [runner(runner.prepare(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return np.concatenate(out) == labels.numpy()


class _Reader:
    """ONNX Runtime's CalibrationDataReader over prepared batches."""

    def __init__(self, batches: list[np.ndarray], name: str):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def peers(fp32: Path, batches: list[np.ndarray], tmp: Path) -> dict[str, Path]:
    """The peers' INT8 files of ``fp32``, all calibrated on ``batches``."""
    out = {}
    try:
        import nncf
        import onnx

        model = nncf.quantize(
            onnx.load(str(fp32)),
            nncf.Dataset(batches, lambda b: {"input": b}),
            subset_size=sum(len(b) for b in batches),
        )
        out["nncf"] = tmp / "nncf.onnx"
        onnx.save(model, str(out["nncf"]))
    except ImportError:
        print("nncf is not installed: NNCF rows skipped (pip install nncf)")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "preprocessed.onnx"
    quant_pre_process(str(fp32), str(pre))
    for label, method, extra in (
        ("ort_minmax", CalibrationMethod.MinMax, {}),
        ("ort_percentile", CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
    ):
        out[label] = tmp / f"{label}.onnx"
        quantize_static(
            str(pre),
            str(out[label]),
            _Reader(batches, "input"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options=extra,
        )
    return out


def timed_rounds(runners: dict, make_input, batch_sizes: list[int], repeats: int, per_round: int = 4) -> dict:
    """``measure`` one round at a time (each model in turn, ``per_round`` timed runs after the idle pause and
    the settle run): {model: {batch size: [p50 of each round]}}. Comparing two models round by round
    (paired ratios) holds when the machine's speed changes between rounds (OpenVINO's batch-64 times here
    jump between about 15 and 45 ms for minutes at a time, for every OpenVINO model at once). The rounds
    after the first visit the models in a seeded random order, so that no model always follows the same one
    (in a fixed order the shipped deployable always ran right after the same file's own session). That did
    not make two sessions of one file agree any better: their paired ratio at batch 1 was 1.036–1.046 in a
    fixed order and 0.956–1.195 shuffled, on three recipes (the A/A line of the output)."""
    rounds = max(1, repeats // per_round)
    out: dict = {n: {b: [] for b in batch_sizes} for n in runners}
    order = random.Random(0)
    for b in batch_sizes:
        for i in range(rounds):
            names = list(runners)
            if i:  # a fresh order each round after the first: no model always follows the same one
                order.shuffle(names)
            res = measure(
                {n: runners[n] for n in names}, make_input, [b], warmup=10 if i == 0 else 0, repeats=per_round,
                rounds=1, show=False,
            )  # fmt: skip
            for n in runners:
                out[n][b].append(res[n][b].p50)
    return out


def twin_of(shipped: dict) -> str:
    """The benchmark's name of the shipped deployable's file on its runtime, timed in a session of its own."""
    stem, rt = Path(shipped["file"]).stem, shipped["runtime"]
    if stem.startswith("model_int8"):
        return f"deploycraft {stem} on {rt}"
    return "FP32 on openvino, bf16" if shipped.get("openvino_precision_hint") == "bf16" else f"FP32 on {rt}"


def paired(times: dict, a: str, b: str, bs: int) -> float:
    """Median over rounds of a's p50 over b's p50 in the same round."""
    return float(np.median(np.asarray(times[a][bs]) / np.asarray(times[b][bs])))


def auto_check(models: dict, times: dict, shipped: str, budget: float | None, batch_sizes: list[int]) -> dict:
    """Is the shipped deployable the fastest of auto's candidates (the FP32 file and deploycraft's INT8 files
    on every runtime, inside the accuracy budget) in this benchmark, within TOLERANCE? Scored as verify
    scores them (geometric mean over batch sizes of the latency relative to the fastest), but round by
    round: per batch size, the median over rounds of each candidate's p50 over the round's fastest."""
    names = [n for n in models if n.startswith("FP32 on ") or n.startswith("deploycraft model_int8")] + [shipped]
    reference = models.get("FP32 on onnxruntime", {}).get("top1")
    inside = {n: budget is None or reference is None or reference - models[n]["top1"] <= budget + 1e-12 for n in names}
    score = {}
    for n in names:
        logs = []
        for bs in batch_sizes:
            best = np.min([times[m][bs] for m in names], axis=0)
            logs.append(np.log(np.median(np.asarray(times[n][bs]) / best)))
        score[n] = float(np.exp(np.mean(logs)))
    fastest = min((n for n in names if inside[n]), key=score.get, default=shipped)
    return {
        "fastest": fastest,
        "shipped_relative_latency": round(score[shipped], 4),
        "shipped_is_fastest": score[shipped] <= score[fastest] * (1 + TOLERANCE),
        "table": {n: {"relative_latency": round(score[n], 4), "within_budget": inside[n]} for n in names},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--images", type=int, default=None, help="held-out images (default: the recipe's)")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument(
        "--train-images", type=int, default=0, help="also compare top-1 with NNCF on this many training images"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    run = args.run_dir
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    if args.images:
        raw["data"]["val_subset"] = args.images
    recipe = build_recipe(raw)
    data = build_data(recipe.data, recipe.seed)
    q = recipe.stage("quantize")
    images, provenance = data.calibration_images(q.num_calibration if q else 512)
    batches = [prepare_batch(images[i : i + 64], data.spec).numpy() for i in range(0, len(images), 64)]
    shipped = json.loads((run / "deploy" / "deployable.json").read_text())
    threads = physical_cores()
    runtimes = [r for r in ("onnxruntime", "openvino") if available(r)]
    ours = {p.stem: p for p in sorted((run / "deploy").glob("model_int8*.onnx"))}
    fp32 = run / "deploy" / "model_fp32.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        others = peers(fp32, batches, Path(tmp))
        runners = {}
        for rt in runtimes:
            runners[f"FP32 on {rt}"] = onnx_runner(rt, fp32, threads)
        if "openvino" in runtimes:
            runners["FP32 on openvino, bf16"] = onnx_runner("openvino", fp32, threads, "bf16")
        for stem, path in ours.items():
            for rt in runtimes:
                runners[f"deploycraft {stem} on {rt}"] = onnx_runner(rt, path, threads)
        hint = shipped.get("openvino_precision_hint") or "f32"
        main = f"deploycraft shipped ({shipped['model']})"
        runners[main] = onnx_runner(shipped["runtime"], run / shipped["file"], threads, hint)
        if "nncf" in others:
            for rt in runtimes:
                runners[f"NNCF default PTQ on {rt}"] = onnx_runner(rt, others["nncf"], threads)
        for label in ("ort_minmax", "ort_percentile"):
            runners[f"ORT quantize_static {label.split('_')[1]} on onnxruntime"] = onnx_runner(
                "onnxruntime", others[label], threads
            )
        sizes = {n: Path(r.path).stat().st_size for n, r in runners.items()}
        preds: dict[str, list] = {n: [] for n in runners}
        acc = {n: top1(lambda x, r=r: r(r.prepare(x)), data, 256, n, predictions=preds[n]) for n, r in runners.items()}
        labels = torch.cat([y for _, y in data.val_batches(256)]).numpy()
        right = {n: torch.cat(p).numpy() == labels for n, p in preds.items()}
        nncf_ov = "NNCF default PTQ on openvino"
        paired_top1 = {}
        if nncf_ov in runners:
            paired_top1["held_out"] = mcnemar(right[main], right[nncf_ov])
            if args.train_images:
                from deploycraft.quant.sensitivity import training_sample

                images, ys, what = training_sample(data, args.train_images, "--train-images")
                paired_top1["training_split"] = {
                    **mcnemar(right_on(runners[main], images, ys), right_on(runners[nncf_ov], images, ys)),
                    "source": what,
                }
        x = torch.from_numpy(np.concatenate(batches))
        x = x.repeat(-(-max(args.batch) // len(x)), 1, 1, 1)
        times = timed_rounds(runners, lambda bs: x[:bs], args.batch, args.repeats)
    p50 = {n: {b: float(np.median(times[n][b])) for b in args.batch} for n in runners}
    print(f"{run}: {threads} threads, top-1 on {data.num_val} held-out images; calibration: {provenance}")
    header = f"{'model':<56}{'top-1':>8}" + "".join(f"{'p50 bs' + str(b):>12}" for b in args.batch) + f"{'MB':>7}"
    print(header)
    out = {"run": str(run), "threads": threads, "images": data.num_val, "models": {}, "rounds_p50_ms": {
        n: {str(b): [round(t, 4) for t in times[n][b]] for b in args.batch} for n in runners
    }}  # fmt: skip
    for n in runners:
        cells = "".join(f"{p50[n][b]:>12.3f}" for b in args.batch)
        print(f"{n:<56}{acc[n] * 100:>7.2f}%{cells}{sizes[n] / 1e6:>7.2f}")
        out["models"][n] = {"top1": acc[n], "p50_ms": {str(b): p50[n][b] for b in args.batch}, "bytes": sizes[n]}
    twin = twin_of(shipped)
    if twin in runners:  # the same file on the same runtime in its own session: the benchmark's own noise
        out["a_a"] = {str(b): round(paired(times, twin, main, b), 3) for b in args.batch}
        print(f"A/A, the shipped deployable against {twin} (the same file, another session): {out['a_a']}")
    if nncf_ov in runners:
        ratio = {b: paired(times, nncf_ov, main, b) for b in args.batch}  # > 1: the shipped one is faster
        verdict = {
            "as_fast_as_nncf_openvino": all(r >= 1 / (1 + TOLERANCE) for r in ratio.values()),
            "top1_at_least_nncf": acc[main] >= acc[nncf_ov],
            "paired_top1_vs_nncf": paired_top1,
            "p50_ratio_vs_nncf": {str(b): round(r, 3) for b, r in ratio.items()},
            "ratio_of_medians_vs_nncf": {str(b): round(p50[nncf_ov][b] / p50[main][b], 3) for b in args.batch},
        }
        out["verdict"] = verdict
        print(f"shipped vs NNCF on OpenVINO: {verdict}")
    verify = recipe.stage("verify")
    check = auto_check(out["models"], times, main, verify.max_accuracy_drop if verify else None, args.batch)
    out["auto"] = check
    print(
        f"auto: the benchmark's fastest candidate is {check['fastest']} "
        f"({check['table'][check['fastest']]['relative_latency']:.3f}; 1.000 = fastest in every round at every "
        f"batch size); the shipped deployable scores {check['shipped_relative_latency']:.3f}: "
        + ("the fastest within 3 %" if check["shipped_is_fastest"] else "NOT the fastest within 3 %")
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
