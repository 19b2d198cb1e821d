"""Quantize stage (PTQ): calibrate the Q/DQ simulation in torch, write the QDQ ONNX for the target.

The torch simulation and the deployed file are the same arithmetic: quantizers are placed for the
recipe's target (quant/placement.py), calibrated on images outside the held-out split, and exported
as QuantizeLinear/DequantizeLinear by the one deployable builder (deployables.py), which also checks
the file: Q/DQ pairs present, no BatchNormalization, the activation integer type the target needs.
The stage then proves what ONNX Runtime does with it: how many convs its optimizer actually turned
into QLinearConv, and how closely the file agrees with the simulation.

``method: qat`` fine-tunes that calibrated simulation (BN folded and frozen, or with ``qat.bn_fold: after``
trained with batch statistics and folded at the end; straight-through gradients, optionally LSQ-learned
scales) with the train stage's loop (cosine schedule, a checkpoint per epoch, bit-identical resume),
distilling from the FP32 model; a plain-QAT control trains a copy with cross-entropy alone. The
fine-tuned module is exported by the same code as the PTQ one, so the shipped file has the PTQ file's
graph (kept beside it in ``ptq/``) with the trained numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from pydantic import Field, model_validator

from deploycraft.artifacts import write_json
from deploycraft.config import FieldError, OptimConfig, StageConfig, Strict
from deploycraft.deployables import (
    RUNTIME_TARGET,
    TARGET_RUNTIME,
    DeployableCheckError,
    QuantSettings,
    build_deployable,
    build_targets,
    check_int8_execution,
    export_deployable,
    int8_execution_vs_placement,
    onnx_metadata,
    quantized_module,
)
from deploycraft.distill import Distiller, check_stages
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.machine import u8s8_pairs_saturate
from deploycraft.models.io import read_spec
from deploycraft.names import ARTIFACT_FILE, INT8_NAME
from deploycraft.onnx_io import quant_dtypes, relative_error
from deploycraft.progress import log
from deploycraft.quant import fidelity, sensitivity
from deploycraft.quant.graph import ChannelAffine, attach_live_bn, capture, fold_bn, folded_conv_paths, stage_outputs
from deploycraft.quant.modules import QuantConv2d, exact_simulation, fold_live_bn
from deploycraft.quant.placement import act_quantizers, fused_as
from deploycraft.runtime import onnx_runner
from deploycraft.stages.base import Stage, StageOutput, register_stage
from deploycraft.stages.train import train_epochs, where_words


class QATDistillConfig(Strict):
    """Distillation inside QAT: the FP32 model teaches the quantized simulation (logits, Hinton et al. 2015, and
    optionally stage features, FitNets)."""

    enabled: bool = Field(True, description="Distill from the FP32 teacher (else plain cross-entropy QAT).")
    teacher: Literal["after_pruning", "before_pruning"] = Field(
        "after_pruning",
        description="The FP32 teacher: the model being quantized (after pruning and distillation, if any) or "
        "the model before pruning (the train stage's output).",
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft (KD) loss; 1 - alpha weights the labels.")
    feature_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of feature distillation on stage outputs (1x1 adapters where widths differ, as with "
        "teacher: before_pruning after pruning): MSE between the simulation's stage outputs (after the activation "
        "quantizer where the target places one there, else in float) and the FP32 teacher's.",
    )
    control: bool = Field(
        True, description="Also run plain QAT (cross-entropy only, same schedule) on a copy and report it beside KD."
    )


class QATConfig(OptimConfig):
    """Quantization-aware fine-tuning of the calibrated simulation (method: qat): SGD, cosine schedule by
    default, a checkpoint per epoch."""

    epochs: int = Field(2, ge=1, description="Epochs of quantization-aware fine-tuning.")
    lr: float = Field(0.002, gt=0, description="Peak learning rate of SGD (reached after the warm-up).")
    weight_decay: float = Field(5e-5, ge=0, description="L2 weight decay (not applied to biases and scales).")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    learnable_scales: bool = Field(
        False,
        description="Learn activation and weight scales with the weights (LSQ, Esser et al. 2020); else the "
        "calibrated scales stay fixed.",
    )
    crop_padding: int = Field(
        4,
        ge=0,
        description="Augmentation: zero-pad by this many pixels, then random-crop. Left unset, the recipe's last "
        "train or distill stage's value (QAT fine-tunes on the data the model learned from); else 4.",
    )
    hflip: bool = Field(
        True,
        description="Augmentation: random horizontal flips. Left unset, the recipe's last train or distill "
        "stage's value; else on.",
    )
    bn_fold: Literal["before", "after"] = Field(
        "before",
        description="before: BatchNorm folded into the convs before QAT and frozen (the PTQ simulation fine-tuned "
        "as it is); after: each conv's BN kept and trained with batch statistics, the weight quantized folded "
        "with the running statistics (Jacob et al. 2018), folded into the conv at the end. BNs not after a conv "
        "(pre-activation nets, DenseNet) stay folded either way.",
    )
    sync_batchnorm: bool = Field(
        False,
        description="bn_fold: after, data-parallel on GPUs: the live BNs normalize over the whole global batch "
        "(torch's SyncBatchNorm). Without it each process normalizes over its part and the running statistics "
        "folded at the end are rank 0's, as in the train stage. CUDA only; a single process ignores it.",
    )
    divergence_retries: int = Field(
        2,
        ge=0,
        le=8,
        description="When the loss diverges (the median of the last 5 step losses rises to 5x its lowest so far in "
        "the run and 0.5 above it, or the loss is not finite), the epoch starts again from its beginning at half the "
        "learning rate, at most this many times in the run (each restart is reported); 0 ends the stage with an "
        "error at the first divergence.",
    )
    distill: QATDistillConfig = Field(default_factory=QATDistillConfig, description="Distillation inside QAT.")


class QuantizeConfig(StageConfig):
    """INT8 quantization: a calibrated Q/DQ simulation in torch, written as a QDQ ONNX for the recipe's
    `target` (onnxruntime-cpu: U8 activations, Q/DQ on conv outputs and both residual-add inputs, run as
    QLinearConv/QLinearAdd; tensorrt: S8 symmetric, Q/DQ on conv inputs and the residual skip input only)."""

    type: Literal["quantize"] = "quantize"
    method: Literal["ptq", "qat"] = Field(
        "ptq",
        description="ptq: post-training quantization from calibration data; qat: PTQ, then quantization-aware "
        "fine-tuning of the same simulation (settings under `qat`).",
    )
    calibrator: Literal["max", "mean_max", "percentile", "mse", "entropy"] = Field(
        "percentile",
        description="Activation range: observed max; mean_max: the mean over calibration batches (`batch_size` "
        "images each) of each batch's min and max (NNCF's default for activations); a percentile of |x|; the "
        "MSE-optimal clip; or entropy: the clip minimizing the KL divergence between the float and quantized "
        "histograms (TensorRT's default).",
    )
    percentile: float = Field(99.99, gt=50, le=100, description="percentile calibrator: the percentile kept.")
    num_calibration: int = Field(512, ge=1, description="Calibration images used.")
    batch_size: int = Field(64, ge=1, description="Calibration batch size.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales (else one per tensor).")
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit weights, for x86 CPUs without VNNI, whose INT8 kernels (ONNX Runtime's and "
        "OpenVINO's) add pairs of u8 x s8 products in int16 with saturation. auto: on for a CPU target when the "
        "machine running the recipe is such a CPU (AVX2, no VNNI), else off.",
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset of the QDQ model (per-channel Q/DQ needs >= 13).")
    weight_bits: int = Field(
        8,
        ge=2,
        le=8,
        description="Weight bit-width of every conv and linear layer (symmetric; per channel unless per_channel is "
        "false); activations stay 8-bit. 4 bits or fewer are stored as ONNX INT4 (the file becomes opset 21): ONNX "
        "Runtime dequantizes them and runs those convs in float, so they make the file smaller, not faster.",
    )
    ends_at_8_bits: bool = Field(
        True, description="Keep the first conv and the classifier at 8-bit weights whatever weight_bits says."
    )
    layer_bits: dict[str, int] = Field(
        {},
        description="Weight bit-width (2-8) by module path (e.g. layer3.2.conv2), over weight_bits and ends_at_8_bits.",
    )
    bias_correction: bool = Field(
        False,
        description="After calibration, shift each quantized layer's bias (not the classifier's) by the mean "
        "output shift that quantization causes on the calibration images (Nagel et al. 2019; NNCF's default), "
        "layer by layer in graph order. One forward pass of the calibration images per layer.",
    )
    qat: QATConfig = Field(default_factory=QATConfig, description="method: qat: the fine-tuning.")
    sensitivity: bool = Field(
        False,
        description="Per-quantizer sensitivity: top-1 with only that quantizer on, and with only it off, on "
        "`sensitivity_images` images of the training split (never the held-out split); a plot in the report. "
        "Costs two evaluations per quantizer.",
    )
    sensitivity_images: int = Field(1000, ge=10, description="Training-split images of the sensitivity analysis.")
    fallback_images: int = Field(
        5000,
        ge=10,
        description="fallback: auto: training-split images on which the drop is held to the budget (more than "
        "the analysis': a top-1 difference of 0.3 points needs thousands of images to be seen).",
    )
    fallback: Literal["none", "auto"] = Field(
        "none",
        description="auto: after the sensitivity analysis, keep the fewest most sensitive quantizers at higher "
        "precision (the shortest prefix of the ranking, found by bisection) that bring top-1 on `fallback_images` "
        "training images within `fallback_budget` of float: "
        "where weights are below 8 bits, those layers back at 8 bits; otherwise any quantizer in float. The "
        "report lists them with their size and latency cost on the target runtime.",
    )
    fallback_budget: float = Field(
        0.003, ge=0, le=1, description="fallback: auto: the largest top-1 drop from float kept (0.003 = 0.3 points)."
    )
    fallback_max_layers: int = Field(16, ge=1, description="fallback: auto: at most this many quantizers kept.")
    fallback_confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="fallback: auto: the drop is within the budget when its one-sided upper confidence bound is "
        "(paired over the sample's images); 0.5 takes the drop seen on the sample as it is.",
    )
    fidelity_tolerance: float = Field(
        0.1,
        gt=0,
        description="Layer fidelity: every activation quantizer's output in the deployed runtime is compared "
        "with the simulation's on a check batch; the report names the first layer whose relative error exceeds "
        "that of its inputs by more than this (rounding adds under 0.07 per layer in ResNet-50; a wrong scale "
        "in the file adds 0.2 or more).",
    )
    agreement_precision: Literal["float64", "float32"] = Field(
        "float64",
        description="The simulation's arithmetic when its top-1 and its agreement with the deployed file are "
        "measured on the whole held-out split: float64 sums a conv's integer products as exactly as the "
        "runtimes' int32 accumulators and, for a file ONNX Runtime runs, requantizes as its fused kernels do "
        "(QLinearConv, QLinearAdd, QuantizeLinear in float32; the flagship's files: 100.00 % (ONNX Runtime) / "
        "99.88 % (OpenVINO) agreement against 99.73 / 99.72 % in float32), at about five times the CPU time of "
        "float32 (no oneDNN kernels for float64); float32 for large held-out splits.",
    )

    other_runtimes: bool = Field(
        True,
        description="With `target: auto`: also compare each INT8 file with its simulation on the other CPU "
        "runtime, the simulation fused and rounded as that runtime runs the file (OpenVINO fuses conv + "
        "residual add and clips there without rounding; ONNX Runtime rounds after every QLinearConv and "
        "QLinearAdd): top-1 agreement on the held-out split, layer fidelity, INT8 execution. Verify's auto ships "
        "a file on a runtime it was not placed for only where this comparison ran; off, it ships each file on "
        "its own runtime (one held-out pass less per file).",
    )

    @model_validator(mode="after")
    def _bits(self) -> QuantizeConfig:
        for path, bits in self.layer_bits.items():
            if not 2 <= bits <= 8:
                raise FieldError(
                    f"{path}: {bits} bits; weights take 2 to 8", fix="use 2..8", subfield=f"layer_bits.{path}"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _target_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target" in data:
            raise FieldError(
                "`target` is a top-level recipe field now (the deployment target), not a quantize setting",
                fix=f"move it to the top level of the recipe: target: {data['target']}",
                subfield="target",
            )
        return data

    def resolved_reduce_range(self, target: str) -> bool:
        """reduce_range as it applies to ``target``'s files built on this machine."""
        if self.reduce_range != "auto":
            return self.reduce_range
        return target != "tensorrt" and u8s8_pairs_saturate()

    def settings_for(self, target: str) -> QuantSettings:
        return QuantSettings(
            self.calibrator,
            self.percentile,
            self.per_channel,
            self.resolved_reduce_range(target),
            self.batch_size,
            self.weight_bits,
            8 if self.ends_at_8_bits else None,
            tuple(sorted(self.layer_bits.items())),
            self.bias_correction,
        )


# quant_state.pt and quant.json of the recipe's target keep their names; auto adds the OpenVINO ones.
STATE_SUFFIX = {"onnxruntime-cpu": "", "tensorrt": "", "openvino-cpu": "_openvino"}


def load_quantized(float_model: torch.nn.Module, target: str, cfg: QuantizeConfig, state_path: Path):
    """Rebuild the calibrated simulation: same placement, then the saved scales and weights."""
    qmodel = quantized_module(float_model, target, cfg.settings_for(target))
    qmodel.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    for _, q in act_quantizers(qmodel):
        q.mode = "quantize"
    return qmodel.eval()


def _elsewhere_lines(target: str, runtime: str, o: dict[str, Any]) -> list[str]:
    """The report's lines for one INT8 file checked on a runtime it was not placed for."""
    h, proof = o.get("held_out"), o.get("int8_execution") or {}
    if h is None:
        return [f"The {target} file on {runtime} was not compared with its simulation there: {o.get('error')}."]
    line = (
        f"The {target} file on {runtime} (`target: auto` may ship it there), against the simulation fused and "
        f"rounded as {runtime} runs it ({h.get('sim_precision') or o.get('sim_vs_onnx_precision')}): held-out "
        f"top-1 deployed {h['top1_deployed'] * 100:.2f} %, simulated {h['top1_sim'] * 100:.2f} %; top-1 agreement "
        f"simulated–deployed {h['sim_vs_deployed'] * 100:.2f} %, FP32–deployed {h['fp32_vs_deployed'] * 100:.2f} %"
    )
    if proof:
        line += f"; {runtime} runs {proof['int8_convs']} of {proof['convs']} convs in INT8"
        clip = proof.get("clip_only")
        if clip and (clip["runtime"] or clip["simulated"]):
            same = "as simulated" if clip["runtime"] == clip["simulated"] else "not as simulated"
            line += f", clips without rounding at {len(clip['runtime'])} fused residual adds, {same}"
    lines = [line + "."]
    if o.get("shortfalls"):
        lines.append(f"Auto does not ship the {target} file on {runtime}: {'; '.join(o['shortfalls'])}.")
    if o.get("fidelity"):
        lines.append(fidelity.summary_line(o["fidelity"], runtime))
    return lines


# Images per batch of the held-out agreement: the float64 simulation's tensors stay in the caches (the flagship's
# ResNet-50 at 32 px, one core: 3.1 s per 256 images in batches of 64, 5.9 s in one batch of 256).
AGREEMENT_BATCH = 64


def held_out_agreement(
    model: torch.nn.Module,
    qmodel: torch.nn.Module,
    deployed,
    data,
    precision: str = "float64",
    runtime: str | None = None,
) -> dict[str, Any]:
    """Top-1 of the FP32 model, the simulation (in float64 by default, computing as ``runtime`` does, see
    ``exact_simulation``) and the deployed file on the whole held-out split, and how often each pair predicts
    the same class (agreement shows what top-1 alone hides: errors that cancel)."""
    from deploycraft.progress import bar

    model.eval()
    # float64: the runtimes' exact integer sums (modules.exact_simulation); float32: as the simulation trains
    sim = exact_simulation(qmodel, runtime) if precision == "float64" else qmodel.eval()
    dtype = torch.float64 if precision == "float64" else torch.float32
    n = 0
    right = {"fp32": 0, "sim": 0, "deployed": 0}
    same = {"fp32_vs_sim": 0, "sim_vs_deployed": 0, "fp32_vs_deployed": 0}
    with torch.inference_mode(), bar("held-out agreement", data.num_val_batches(AGREEMENT_BATCH)) as b:
        for x, y in data.val_batches(AGREEMENT_BATCH):
            pred = {
                "fp32": model(x).argmax(1),
                "sim": sim(x.to(dtype)).argmax(1),
                "deployed": torch.from_numpy(deployed(x.numpy())).argmax(1),
            }
            for k, p in pred.items():
                right[k] += int((p == y).sum())
            for pair in same:
                a, c = pair.split("_vs_")
                same[pair] += int((pred[a] == pred[c]).sum())
            n += len(y)
            b.advance()
    return {
        "images": n,
        "sim_precision": sim.simulation_arithmetic if precision == "float64" else precision,
        **{f"top1_{k}": v / n for k, v in right.items()},
        **{k: v / n for k, v in same.items()},
    }


def _learn_scales(qmodel: torch.nn.Module, learn: bool) -> None:
    """Scales become trained parameters (LSQ) or buffers again; a quantizer that fallback turned off stays a
    buffer (a parameter the forward never uses would stop DDP)."""
    for m in qmodel.modules():
        if not hasattr(m, "learn_scale"):
            continue
        active = getattr(m, "mode", "quantize") == "quantize" and getattr(m, "quantize_weight", True)
        m.learn_scale(learn and active)


def quantizer_ranges(qmodel: torch.nn.Module) -> dict[str, list[float]]:
    """Each activation quantizer's representable range, from its (possibly trained) scale and zero point."""
    out = {}
    for name, q in act_quantizers(qmodel):
        qmin, qmax = q.qrange
        scale, zp = float(q.scale), int(q.zero_point)
        out[name] = [(qmin - zp) * scale, (qmax - zp) * scale]
    return out


def qat_finetune(
    qmodel: torch.nn.Module,
    data,
    cfg: QATConfig,
    workdir: Path,
    seed: int,
    teacher: torch.nn.Module | None = None,
    label: str = "QAT",
    device: str = "cpu",
    world=None,
    bn_pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module]] | None = None,
) -> list[dict]:
    """Fine-tune a calibrated simulation in place (distilling from ``teacher`` when given: logits, and stage
    features when ``cfg.distill.feature_weight`` > 0, the adapters trained and checkpointed with the model);
    returns the history. Resumes from ``workdir/checkpoint.pt`` like training: a killed run re-run ends
    bit-identical.

    With ``cfg.bn_fold == "before"`` the folded model has no BatchNorm left (BN folded and frozen); train mode
    changes nothing but the scales' gradients. With ``"after"``, ``bn_pairs`` (``fold_bn``'s record of the FP32
    model) gives each folded conv its BN back, trained with batch statistics and folded again on return.
    Scales are buffers again on return, so the module exports and saves as after PTQ.
    """
    if cfg.bn_fold == "after":
        if bn_pairs is None:
            raise ValueError("bn_fold: after needs bn_pairs, fold_bn's record of the FP32 model")
        if not attach_live_bn(qmodel, bn_pairs):
            raise UserError(
                "qat.bn_fold: after, but no conv of this model is followed by a BatchNorm",
                field="stages.quantize.qat.bn_fold",
                fix="set qat.bn_fold: before",
            )
    _learn_scales(qmodel, cfg.learnable_scales)
    loss_fn = None
    distiller = None
    if teacher is not None:
        d = cfg.distill
        # the adapters (feature_weight > 0) are drawn from the run's seed: a re-run starts from the same ones
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            distiller = Distiller(
                qmodel, teacher, d.temperature, d.alpha, d.feature_weight, data.sample_input(2), cfg.label_smoothing
            )
        loss_fn = distiller.loss
    try:
        if teacher is not None:
            teacher.to(device)  # inside the try: the student's feature taps come out whatever happens here
        history = train_epochs(
            qmodel, data, cfg, workdir, seed, loss_fn, label=label, device=device, field="stages.quantize.qat",
            extra=distiller.adapters if distiller is not None else None, world=world,
        )  # fmt: skip
    finally:
        if distiller is not None:
            distiller.close()
            teacher.to("cpu")
        _learn_scales(qmodel, False)
    fold_live_bn(qmodel)  # not reached when the fine-tuning fails: the caller discards the module then
    return history


def check_feature_kd(student: torch.nn.Module, teacher: torch.nn.Module, arch: str, field: str) -> None:
    """Feature distillation inside QAT needs stage outputs that the simulation's graph carries, and the same
    stages in the teacher; else one UserError naming ``field`` (stages.<index>.qat.distill.feature_weight).

    ``student``: the model to quantize or its simulation (a GraphModule); checked before any training."""
    fix = "set qat.distill.feature_weight: 0 (logit distillation only)"
    stages = check_stages(student, teacher, arch, field, fix)
    try:
        stage_outputs(student if isinstance(student, torch.fx.GraphModule) else capture(student), stages)
    except ValueError as exc:
        raise UserError(f"{arch}: the quantized graph hides a stage output: {exc}", field=field, fix=fix) from None


AUGMENTATION = ("crop_padding", "hflip")


def qat_settings(recipe, q: QATConfig) -> tuple[QATConfig, str]:
    """The QAT settings with the augmentation the recipe leaves unset under ``qat`` taken from its last
    enabled train or distill stage: QAT fine-tunes on the data the model learned from (the flagship's
    ResNet-50, trained one epoch without crops and flips, scores 0.50 on cropped and flipped training batches
    and 0.85 on plain ones). Also says where they came from."""
    unset = [k for k in AUGMENTATION if k not in q.model_fields_set]
    source = next((st for st in reversed(recipe.stages) if st.type in ("train", "distill") and st.enabled), None)
    if not unset or source is None:
        return q, "qat" if not unset else "defaults"
    return q.model_copy(update={k: getattr(source, k) for k in unset}), f"the {source.type} stage"


def _clip_difference(clip: dict[str, list[str]]) -> str:
    runtime, simulated = set(clip["runtime"]), set(clip["simulated"])
    parts = []
    if runtime - simulated:
        parts.append("only the runtime: " + ", ".join(sorted(runtime - simulated)[:4]))
    if simulated - runtime:
        parts.append("only the simulation: " + ", ".join(sorted(simulated - runtime)[:4]))
    return "; ".join(parts)


def _augmentation_words(aug: dict[str, Any] | None) -> str:
    if not aug:
        return ""
    what = [f"{aug['crop_padding']}-pixel crops" if aug["crop_padding"] else "no crops"]
    what.append("flips" if aug["hflip"] else "no flips")
    source = {"qat": "as set under qat", "defaults": "the defaults"}.get(aug["from"], f"as in {aug['from']}")
    return f", {' and '.join(what)} ({source})"


def _bn_words(qat: dict[str, Any]) -> str:
    if qat.get("bn_fold") == "after":
        frozen = qat.get("frozen_bn") or 0
        rest = f" ({frozen} BN(s) not after a conv folded and frozen)" if frozen else ""
        return f"BN trained with batch statistics in {qat['live_bn']} conv(s) and folded at the end{rest}"
    return "BN folded and frozen"


def _restart_words(qat: dict[str, Any], key: str = "history", subject: str = "The loss") -> str:
    """The divergence guard's restarts (train_epochs), if any: where the loss ran away and the lr it went on at."""
    restarts = [(h["epoch"], r) for h in qat.get(key) or [] for r in h.get("restarts", [])]
    if not restarts:
        return ""
    where = where_words(restarts)
    return (
        f" {subject} diverged {len(restarts)} time(s) ({where}); each time the epoch started again at half the "
        f"learning rate: from epoch {restarts[-1][0]} on the peak lr was {qat['lr'] * restarts[-1][1]['lr_scale']:.3g}."
    )


def _qat_line(qat: dict[str, Any]) -> str:
    from deploycraft.formatting import fmt_pct

    scales = "LSQ-learned scales" if qat["learnable_scales"] else "calibrated scales kept fixed"
    kd = "QAT"
    if qat.get("teacher"):
        fw = qat.get("feature_weight") or 0.0
        what = f"logits and stage features, feature weight {fw:g}" if fw > 0 else "logits only"
        if "alpha" in qat:  # runs before the weights were recorded did not say
            what += f", soft-target weight {qat['alpha']:g}, T {qat['temperature']:g}"
        kd = f"QAT with KD ({what}) from {qat['teacher']}"
    line = (
        f"QAT: {qat['epochs']} epoch(s), SGD lr {qat['lr']} {qat['schedule']}, {scales}, {_bn_words(qat)}"
        f"{_augmentation_words(qat.get('augmentation'))}. "
        f"Held-out top-1: FP32 {fmt_pct(qat['top1_fp32'])}, PTQ {fmt_pct(qat['top1_ptq'])}, "
        f"{kd} {fmt_pct(qat['top1_qat'])}"
    )
    if "top1_qat_control" in qat:
        line += f", plain QAT (control) {fmt_pct(qat['top1_qat_control'])}"
    line += f" (simulated). The PTQ file ({qat['ptq_file']}) is kept; the shipped file has its graph."
    return line + _restart_words(qat) + _restart_words(qat, "control_history", "In the control, the loss")


ALL_KEPT = "(all kept)"  # the fallback's cost table: every kept quantizer at once (the PTQ file with the fallback)
COST_GROUP = 6  # files timed at a time beside the file without fallback


def grouped_costs(open_runner, files: dict[str, Path], make_input, batch_sizes: list[int], group: int = COST_GROUP,
                  measure_fn=None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:  # fmt: skip
    """Median latency of each file minus that of ``files["none"]``, per batch size, timed in groups of at most
    ``group`` files beside their own run of ``files["none"]`` (interleaved rounds within a group), each
    group's sessions closed before the next opens: dozens of sessions alive in one process (the flagship
    kept 52 layers: 53 sessions) made batch 64 unreliable. Returns the differences (ms, keyed by batch size
    as a string; each against the base timed in its own group) and the base's median over the groups."""
    import gc
    import statistics

    if measure_fn is None:
        from deploycraft.runtime.bench import measure as measure_fn
    names = [n for n in files if n != "none"]
    if not names:
        return {}, {}
    deltas: dict[str, dict[str, float]] = {}
    base: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    for start in range(0, len(names), group):
        part = names[start : start + group]
        runners = {"none": open_runner(files["none"]), **{n: open_runner(files[n]) for n in part}}
        times = measure_fn(runners, make_input, batch_sizes, warmup=3, repeats=40, show=True)
        del runners  # the sessions go before the next group's open
        gc.collect()
        for bs in batch_sizes:
            base[bs].append(times["none"][bs].p50)
        for n in part:
            deltas[n] = {str(bs): times[n][bs].p50 - times["none"][bs].p50 for bs in batch_sizes}
    return deltas, {str(bs): statistics.median(v) for bs, v in base.items()}


def _search_words(fb: dict[str, Any]) -> str:
    """How the fallback's prefix was found (runs before the bisection recorded no ``search``: one per unit)."""
    if "search" not in fb:
        return ""
    return f" (the shortest prefix of the ranking, by bisection: {len(fb['steps'])} evaluations)"


def _cost_words(costs: dict[str, Any]) -> str:
    """How the cost table was timed (runs before the grouped timing: every file in one set of rounds)."""
    if "group" not in costs:
        return ""
    return (
        f"{' and of all together' if 'all' in costs else ''} (median latency; timed at most {costs['group']} files "
        f"at a time, each against the file without fallback timed in the same rounds; that file's row: the median "
        f"over those groups)"
    )


def _bound_words(fb: dict[str, Any]) -> str:
    """The drop and its confidence bound (runs before the bound was recorded: nothing)."""
    if "drop_bound" not in fb:
        return ""
    return (
        f"; drop {fb['drop'] * 100:.2f} pt, at most {fb['drop_bound'] * 100:.2f} pt at "
        f"{fb['confidence'] * 100:g} % one-sided confidence"
    )


def _sensitivity_lines(sens: dict[str, Any]) -> list[str]:
    """The analysis in a sentence, the fallback's table of kept quantizers with their costs, the plot."""
    order = {name: i for i, name in enumerate(sensitivity.ranking(sens))}
    ranked = sorted(sens["units"], key=lambda r: order[r["unit"]])
    top = "; ".join(
        f"{r['label']}: {0.0 - r['drop_alone'] * 100:+.2f} pt when only it is quantized, "
        f"{r['gain_in_float'] * 100 + 0.0:+.2f} pt when only it is left in float"
        for r in ranked[:3]
    )
    lines = [
        f"Sensitivity ({len(sens['units'])} quantizers, {sens['source']}): float {sens['top1_float'] * 100:.2f} %, "
        f"all quantized {sens['top1_quantized'] * 100:.2f} %; most sensitive: {top}."
    ]
    fb = sens.get("fallback")
    if fb is not None:
        if not fb["chosen"]:
            lines.append(
                f"Fallback (auto, budget {fb['budget'] * 100:.2f} pt): nothing kept: on {fb['images']} training-split "
                f"images the quantized model's top-1 {fb['top1_after'] * 100:.2f} % is within it of float's "
                f"{fb['top1_float'] * 100:.2f} %{_bound_words(fb)}."
            )
        else:
            status = "within" if fb["within_budget"] else "**still outside**"
            lines.append(
                f"Fallback (auto, budget {fb['budget'] * 100:.2f} pt): {len(fb['chosen'])} quantizer(s) kept at higher "
                f"precision{_search_words(fb)}, top-1 on {fb['images']} training-split images "
                f"{fb['steps'][0]['top1'] * 100:.2f} % → "
                f"{fb['top1_after'] * 100:.2f} % against {fb['top1_float'] * 100:.2f} % in float "
                f"({status} the budget{_bound_words(fb)}); held-out top-1 without fallback "
                f"{fb['held_out_top1_before'] * 100:.2f} % "
                f"(with it: the verify table). "
                f"Cost of each alone{_cost_words(fb['costs'])}, on {fb['costs']['runtime']}:"
            )
            bs = fb["costs"]["batch_sizes"]
            lines += [
                "",
                "| kept | action | file size | " + " | ".join(f"latency batch {b}" for b in bs) + " |",
                "|---|---|---|" + "---|" * len(bs),
            ]
            for a in fb["actions"]:
                c = fb["costs"]["per_unit"][a["unit"]]
                lat = " | ".join(f"{c['latency_ms'][str(b)]:+.3f} ms" for b in bs)
                lines.append(f"| {a['unit']} | {a['action']} | {c['bytes'] / 1e3:+.1f} kB | {lat} |")
            base = fb["costs"]
            if "all" in base:  # runs before the grouped timing measured only each alone
                c = base["all"]
                lat = " | ".join(f"{c['latency_ms'][str(b)]:+.3f} ms" for b in bs)
                kept = f"**all {len(fb['actions'])} together** (the PTQ file with the fallback)"
                lines.append(f"| {kept} | | {c['bytes'] / 1e3:+.1f} kB | {lat} |")
            lines.append(
                f"| (file without fallback) | | {base['base_bytes'] / 1e3:.1f} kB | "
                + " | ".join(f"{base['base_ms'][str(b)]:.3f} ms" for b in bs)
                + " |"
            )
            lines.append("")
    if sens.get("plot"):
        lines.append(f"![quantizer sensitivity]({sens['plot']})")
    return lines


@register_stage
class QuantizeStage(Stage):
    type = "quantize"
    Config = QuantizeConfig
    rank = 3
    report_order = 4
    reads = ("device", "target")  # QAT trains on the recipe's device
    reads_calibration = True

    @classmethod
    def key_config(cls, config) -> dict:
        """PTQ ignores the QAT settings, and only the percentile calibrator reads ``percentile``."""
        out = config.model_dump(mode="json")
        if config.method == "ptq":
            out.pop("qat")
        if config.calibrator != "percentile":
            out.pop("percentile")
        return out

    @classmethod
    def derived(cls, recipe, config) -> dict:
        """QAT's crop_padding and hflip, unless set under ``qat``, come from the last train or distill stage:
        the values it trains with join the key (an explicit ``hflip: true`` and one inherited as false
        dump alike). reduce_range: auto follows the machine (a run folder moved to a CPU with VNNI, or
        without, quantizes again)."""
        if config is None:
            return {}
        out: dict[str, Any] = {}
        if config.reduce_range == "auto":
            out["u8s8_pairs_saturate"] = u8s8_pairs_saturate()
        if config.method == "qat":
            resolved, _ = qat_settings(recipe, config.qat)
            out["qat"] = {k: getattr(resolved, k) for k in AUGMENTATION}
        return out

    config: QuantizeConfig

    @classmethod
    def check(cls, recipe, index: int) -> None:
        cfg = recipe.stages[index]
        d = recipe.data
        if cfg.enabled and (cfg.sensitivity or cfg.fallback == "auto") and d.dataset == "imagefolder":
            if not (Path(d.root) / d.train_split).is_dir():
                raise UserError(
                    f"the sensitivity analysis chooses layers on the training split, and "
                    f"{Path(d.root) / d.train_split} is missing (the held-out split is for the report)",
                    field=f"stages.{index}.{'fallback' if cfg.fallback == 'auto' else 'sensitivity'}",
                    fix="point data.train_split at the training images, or turn the option off",
                )
        if cfg.enabled and cfg.method == "qat" and d.dataset == "imagefolder":
            if not (Path(d.root) / d.train_split).is_dir():
                raise UserError(
                    f"method: qat fine-tunes on the training split, and {Path(d.root) / d.train_split} is missing",
                    field=f"stages.{index}.method",
                    fix="point data.train_split at the training images, or use method: ptq",
                )
        kd = cfg.qat.distill
        if cfg.enabled and cfg.method == "qat" and kd.feature_weight > 0 and not kd.enabled:
            raise UserError(
                "feature distillation needs the FP32 teacher, and qat.distill.enabled is false",
                field=f"stages.{index}.qat.distill.feature_weight",
                fix="set qat.distill.enabled: true, or qat.distill.feature_weight: 0 (plain QAT)",
            )

    @classmethod
    def preflight(cls, pre, index: int) -> None:
        cfg = pre.recipe.stages[index]
        if not cfg.enabled:
            return
        kd = cfg.qat.distill
        if cfg.method == "qat" and cfg.qat.bn_fold == "after":
            if not folded_conv_paths(pre.model):
                raise UserError(
                    f"qat.bn_fold: after, but no conv of {pre.recipe.model.arch} is followed by a BatchNorm",
                    field=f"stages.{index}.qat.bn_fold",
                    fix="set qat.bn_fold: before",
                )
        if cfg.method == "qat" and kd.enabled and kd.feature_weight > 0:
            # either teacher is the recipe's architecture (before or after pruning, which keeps the stages)
            check_feature_kd(pre.model, pre.model, pre.recipe.model.arch, f"stages.{index}.qat.distill.feature_weight")
        if not cfg.layer_bits:
            return
        modules = dict(pre.model.named_modules())
        for path in cfg.layer_bits:
            if not isinstance(modules.get(path), (torch.nn.Conv2d, torch.nn.Linear)):
                near = [n for n, m in modules.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][:4]
                raise UserError(
                    f"{pre.recipe.model.arch} has no conv or linear layer {path!r}",
                    field=f"stages.{index}.layer_bits.{path}",
                    fix=f"name a conv or linear module path, e.g. {', '.join(near)}",
                )

    def runs_data_parallel(self) -> bool:
        """QAT trains: under torchrun every rank fine-tunes (DDP); calibration, export and checks stay on rank 0."""
        return self.config.method == "qat"

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        # the ranks of a data-parallel QAT run read the model together; otherwise rank 0 runs this stage alone
        model = ctx.load_shared_model() if self.runs_data_parallel() else ctx.load_model()
        # rank 0's list of targets (auto depends on what is installed, which may differ between machines)
        targets = build_targets(ctx.recipe.target) if ctx.world.is_main else None
        if self.runs_data_parallel():
            targets = ctx.world.publish(targets)
        if not ctx.world.is_main:
            for target in targets:
                self._follow(ctx, model, target, workdir)
            return StageOutput()  # rank 0 writes the stage; its output is the stage's
        # target auto: each file is also compared with its simulation on the other CPU runtimes it may ship on
        auto = ctx.recipe.target == "auto" and cfg.other_runtimes
        self._elsewhere = [TARGET_RUNTIME[t] for t in targets] if auto else []
        images, provenance = data.calibration_images(cfg.num_calibration)
        spec = read_spec(ctx.model_dir)
        check = data.sample_input(64)
        artifacts, per_target = {}, {}
        skipped = {}
        for target in targets:
            self._announced = self._busy = False
            try:
                artifact, metrics = self._build(ctx, model, target, images, provenance, spec, check, workdir)
            except Exception as exc:
                if ctx.recipe.target != "auto" or self._busy or isinstance(exc, UserError):
                    # busy: the other ranks are inside this target's fine-tuning; a UserError is the recipe's to
                    # fix (a bad QAT setting, a diverged fine-tuning) whatever the runtime, not a runtime to skip
                    raise
                if not self._announced:
                    self._share(ctx, None)  # the other ranks of a QAT run skip this target too
                # auto tries every CPU runtime; one that cannot take this network is left out, and said so
                skipped[target] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                log(f"  [yellow]{target}: left out of auto ({skipped[target]})[/]")
                continue
            artifacts[INT8_NAME[target].value] = artifact
            per_target[target] = metrics
        if not per_target:
            raise DeployableCheckError(f"no INT8 file could be built for any CPU runtime: {skipped}")
        first = next(iter(per_target.values()))
        metrics = {
            **first,
            "method": cfg.method,
            "calibrator": cfg.calibrator,
            "percentile": cfg.percentile if cfg.calibrator == "percentile" else None,
            "bias_correction": cfg.bias_correction,
            "calibration": provenance,
            "calibration_images": len(images),
            "targets": per_target,
            "skipped_targets": skipped,
        }
        return StageOutput(artifacts=artifacts, metrics=metrics)

    def _build(self, ctx, model, target: str, images, provenance: str, spec: dict, check, workdir: Path):
        """One target's INT8 file, checked against its simulation and its runtime's INT8 execution."""
        cfg, data = self.config, ctx.data
        name = INT8_NAME[target]
        path = workdir / ARTIFACT_FILE[name]
        metadata = onnx_metadata(spec["arch"], "int8", target, data.spec, data.class_names)
        log(f"  {target}: calibrating ({cfg.calibrator}) on {len(images)} images: {provenance}")
        ptq_path = path
        if cfg.method == "qat":
            ptq_path = workdir / "ptq" / STATE_SUFFIX[target].lstrip("_") / ARTIFACT_FILE[name]
            ptq_path.parent.mkdir(parents=True, exist_ok=True)
        built = build_deployable(
            model,
            "int8",
            ptq_path,
            data.sample_input(2),
            target=target,
            settings=cfg.settings_for(target),
            calibration=(images, data.spec),
            opset=cfg.opset,
            metadata=metadata,
        )
        sens = None
        if cfg.sensitivity or cfg.fallback == "auto":
            sens = self._sensitivity(ctx, built, target, ptq_path, metadata, workdir)
            if sens.get("fallback", {}).get("chosen"):
                built = export_deployable(
                    built.module, "int8", ptq_path, data.sample_input(2), target, cfg.opset, metadata=metadata,
                    ranges=built.ranges,
                )  # fmt: skip
        qat_metrics = None
        if cfg.method == "qat":
            fallback = (sens or {}).get("fallback", {}).get("chosen", [])
            self._share(ctx, {"state": built.module.state_dict(), "fallback": fallback})
            qmodel, qat_metrics = self._qat(ctx, model, built.module, target, workdir)
            self._busy = False  # every collective of this target is done: a later failure may skip it
            ptq_bytes = ptq_path.stat().st_size
            built = export_deployable(
                qmodel, "int8", path, data.sample_input(2), target, cfg.opset, metadata=metadata,
                ranges=quantizer_ranges(qmodel),
            )  # fmt: skip
            qat_metrics["ptq_file"] = str(ptq_path.relative_to(workdir))
            qat_metrics["ptq_bytes"] = ptq_bytes
        qmodel = built.module
        torch.save(qmodel.state_dict(), workdir / f"quant_state{STATE_SUFFIX[target]}.pt")
        # The deployed file computes what the simulation computes: compared in float64 (with ONNX Runtime's own
        # requantization where it runs the file), as on the held-out split below.
        runtime = TARGET_RUNTIME[target]
        compared = self._compare(ctx, model, qmodel, runtime, path, check)
        metrics = {
            "target": target,
            "runtime": runtime,
            "activation_dtype": "/".join(sorted(set(quant_dtypes(built.proto)))),
            "activation_quantizers": sum(1 for _, q in act_quantizers(qmodel) if q.mode == "quantize"),
            "weight_quantizers": sum(1 for m in qmodel.modules() if hasattr(m, "weight_scale")),
            "onnx_ops": built.ops,
            "bias_fitted_channels": built.bias_fitted,
            "bytes": path.stat().st_size,
            **compared["check"],
        }
        if built.bias_fitted:
            log(
                f"  [yellow]{target}: {len(built.bias_fitted)} conv channel(s) with all but zero weights had a bias "
                f"too large for ONNX Runtime's int32 bias; their weight scale was raised so that it fits "
                f"({', '.join(built.bias_fitted[:4])}{', ...' if len(built.bias_fitted) > 4 else ''})[/]"
            )
        by_bits: dict[int, list[str]] = {}
        for mod_name, m in qmodel.named_modules():
            if hasattr(m, "weight_scale"):
                by_bits.setdefault(m.bits, []).append(mod_name)
        metrics["weight_bits"] = {str(b): by_bits[b] for b in sorted(by_bits)}
        metrics["reduce_range"] = cfg.resolved_reduce_range(target)
        metrics["int4_initializers"] = sum(t.data_type == onnx.TensorProto.INT4 for t in built.proto.graph.initializer)
        if qat_metrics is not None:
            metrics["qat"] = qat_metrics
        if sens is not None:
            metrics["sensitivity"] = sens
        metrics["held_out"] = h = compared["held_out"]
        log(
            f"  {target}: held-out top-1 agreement FP32-sim {h['fp32_vs_sim']:.4f}, sim-{runtime} "
            f"{h['sim_vs_deployed']:.4f}, FP32-{runtime} {h['fp32_vs_deployed']:.4f} ({h['images']} images)"
        )
        metrics["fidelity"] = compared["fidelity"]
        first = metrics["fidelity"]["first_over"]
        if first is not None:
            log(
                f"  [yellow]{target}: the deployed file diverges from the simulation at layer {first['layer']} "
                f"({first['quantizer']}: relative error +{first['excess']:.3f} over its inputs)[/]"
            )
        proof = check_int8_execution(path, target, qmodel, workdir)
        if proof is not None:
            clip = proof.get("clip_only")
            if clip and clip["runtime"] != clip["simulated"]:
                log(
                    f"  [yellow]{target}: {proof['runtime']} clips without rounding at other quantizers than the "
                    f"simulation does ({_clip_difference(clip)}); simulation and deployed file will agree less[/]"
                )
            metrics["int8_execution"] = proof
            metrics["int8_conv_fraction"] = proof["int8_convs"] / proof["convs"] if proof["convs"] else None
            log(
                f"  {proof['runtime']} runs {proof['int8_convs']}/{proof['convs']} convs in INT8 "
                f"(the placement quantizes {proof['expected_int8_convs']})"
            )
        log(f"  sim vs {runtime}: top-1 agreement {metrics['sim_vs_onnx_top1_agreement']:.3f} on 64 images")
        for other in self._elsewhere:
            if other == runtime:
                continue
            elsewhere = metrics.setdefault("other_runtimes", {})
            try:
                elsewhere[other] = self._check_elsewhere(ctx, model, qmodel, target, path, other, check, workdir)
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run a file it was not placed for
                # the file stays, checked on its own runtime; only this pairing is off auto's list
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                elsewhere[other] = {"runtime": other, "error": why, "shortfalls": [f"{other} could not run it: {why}"]}
                log(f"  [yellow]{target} file on {other}: not compared ({why}); auto will not ship it there[/]")
        write_json(
            workdir / f"quant{STATE_SUFFIX[target]}.json",
            {"config": cfg.model_dump(mode="json"), "ranges": built.ranges},
        )
        artifact = {"path": path.name, "format": "onnx", "precision": "int8", "backend": runtime, "target": target}
        return artifact, metrics

    def _compare(self, ctx, model, sim_module, runtime: str, path: Path, check) -> dict[str, Any]:
        """The file at ``path`` run by ``runtime`` against the simulation ``sim_module`` (in float64 with that
        runtime's rounding, or as configured): on the check batch, on the held-out split (with FP32 ``model``)
        and layer by layer on 16 images (every quantizer output of both sides is held in memory)."""
        cfg = self.config
        # one float64 copy for the check, the held-out split and the fidelity, computing as ``runtime`` does
        exact = exact_simulation(sim_module, runtime)
        with torch.no_grad():
            sim = exact(check.double()).numpy()
        out = onnx_runner(runtime, path, threads=None)(check.numpy())
        held_out = held_out_agreement(
            model,
            exact if cfg.agreement_precision == "float64" else sim_module,
            onnx_runner(runtime, path, threads=None),
            ctx.data,
            cfg.agreement_precision,
            runtime,
        )
        return {
            "check": {
                "sim_vs_onnx_rel_error": relative_error(out, sim),
                "sim_vs_onnx_top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean()),
                "sim_vs_onnx_precision": exact.simulation_arithmetic,
            },
            "held_out": held_out,
            "fidelity": fidelity.compare(exact, onnx.load(str(path)), runtime, check[:16], cfg.fidelity_tolerance),
        }

    def _check_elsewhere(self, ctx, model, qmodel, target: str, path: Path, runtime: str, check, workdir: Path):
        """The file placed for ``target`` on another CPU runtime (``target: auto`` may ship it there), against
        the simulation fused and rounded as that runtime runs it (``placement.fused_as``): on the check batch,
        on the held-out split and layer by layer, with what that runtime runs in INT8. A shortfall is reported
        (and keeps auto from shipping that pairing), not raised: the file is checked on its own runtime."""
        as_run = fused_as(qmodel, runtime)
        compared = self._compare(ctx, model, as_run, runtime, path, check)
        result: dict[str, Any] = {"runtime": runtime, **compared["check"]}
        proof = int8_execution_vs_placement(path, RUNTIME_TARGET[runtime], as_run, workdir, fused_only=True)
        if proof is not None:
            result["int8_execution"] = proof
        result["held_out"] = compared["held_out"]
        result["fidelity"] = compared["fidelity"]
        short = []
        if proof is not None and proof["int8_convs"] < proof["expected_int8_convs"]:
            short.append(f"{runtime} runs {proof['int8_convs']} of {proof['expected_int8_convs']} convs in INT8")
        clip = (proof or {}).get("clip_only")
        if clip and clip["runtime"] != clip["simulated"]:
            short.append(f"{runtime} clips without rounding elsewhere than simulated ({_clip_difference(clip)})")
        result["shortfalls"] = short
        h = result["held_out"]
        log(
            f"  {target} file on {runtime}: held-out top-1 agreement sim-{runtime} {h['sim_vs_deployed']:.4f} "
            f"(simulation fused as {runtime} runs it), FP32-{runtime} {h['fp32_vs_deployed']:.4f}"
            + (f"; [yellow]{'; '.join(short)}: auto will not ship it there[/]" if short else "")
        )
        return result

    _elsewhere: list[str] = []  # the CPU runtimes each INT8 file is compared on besides its own (target auto)
    _announced = False  # rank 0 told the other ranks of a data-parallel QAT run whether this target runs
    _busy = False  # ... and they are fine-tuning it with rank 0

    def _share(self, ctx, payload: dict[str, Any] | None) -> None:
        """Rank 0 sends the calibrated simulation (state and fallback) to the other ranks of a data-parallel QAT
        run, or None when this target is left out; nothing to do in one process."""
        if ctx.world.size == 1 or self.config.method != "qat":
            return
        self._announced = True
        self._busy = payload is not None
        import io

        # the others wait on the launcher's store (no timeout) while rank 0 calibrates, then take the bytes
        if ctx.world.publish(payload is not None):
            buf = io.BytesIO()
            torch.save(payload, buf)
            ctx.world.broadcast_bytes(buf.getvalue())

    def _follow(self, ctx, model, target: str, workdir: Path) -> None:
        """A rank other than 0: rebuild rank 0's calibrated simulation of ``target`` and fine-tune it with the
        other ranks (or skip the target, as rank 0 did)."""
        import io

        if not ctx.world.publish(None):
            return  # rank 0 left this target out
        payload = ctx.world.broadcast_bytes(None)
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        qmodel = quantized_module(model, target, self.config.settings_for(target))
        for _, q in act_quantizers(qmodel):
            q.mode = "quantize"
        sensitivity.apply_fallback(qmodel, list(obj["fallback"]))
        qmodel.load_state_dict(obj["state"], strict=True)
        self._qat(ctx, model, qmodel.eval(), target, workdir)

    def _sensitivity(self, ctx, built, target: str, path: Path, metadata: dict, workdir: Path) -> dict[str, Any]:
        """The per-quantizer analysis of the calibrated simulation, and (fallback: auto) the quantizers kept at
        higher precision, applied to ``built.module``, each one's size and latency cost measured on the runtime."""
        cfg, data = self.config, ctx.data
        field = "stages.quantize." + ("fallback" if cfg.fallback == "auto" else "sensitivity")
        images, labels, source = sensitivity.training_sample(data, cfg.sensitivity_images, field)
        log(f"  {target}: sensitivity of every quantizer on {source}")
        result = sensitivity.analyse(built.module, images, labels)
        result["source"] = source
        sub = STATE_SUFFIX[target].lstrip("_") or "onnxruntime"
        png = workdir / "plots" / f"sensitivity_{sub}.png"
        if sensitivity.plot(result, png):
            try:
                result["plot"] = png.relative_to(ctx.run.root).as_posix()
            except ValueError:
                result["plot"] = png.as_posix()
        top = sensitivity.ranking(result)[:3]
        log(
            f"  {target}: float {result['top1_float']:.4f}, all quantized {result['top1_quantized']:.4f} on the "
            f"sample; most sensitive: {', '.join(top)}"
        )
        if cfg.fallback != "auto":
            return result
        images, labels, _ = sensitivity.training_sample(data, cfg.fallback_images, field)
        choice = sensitivity.choose_fallback(
            built.module, result, images, labels, cfg.fallback_budget, cfg.fallback_max_layers,
            confidence=cfg.fallback_confidence,
        )  # fmt: skip
        choice["budget"] = cfg.fallback_budget
        if choice["chosen"]:
            # for the report only (the choice above saw the training split alone): what PTQ gives without it
            choice["held_out_top1_before"] = top1(torch_predictor(built.module), data, 256, "top-1 before fallback")
            choice["costs"] = self._fallback_costs(ctx, built, target, path, metadata, choice["chosen"], workdir)
            choice["actions"] = sensitivity.apply_fallback(built.module, choice["chosen"])
        log(
            f"  {target}: fallback keeps {len(choice['chosen'])} quantizer(s) at higher precision "
            f"({', '.join(choice['chosen']) or 'none needed'}); top-1 on {choice['images']} training images "
            f"{choice['top1_after']:.4f}, float {choice['top1_float']:.4f}{_bound_words(choice)}"
            + ("" if choice["within_budget"] else f" — [yellow]still outside the budget of {cfg.fallback_budget}[/]")
        )
        result["fallback"] = choice
        return result

    def _fallback_costs(self, ctx, built, target: str, path: Path, metadata: dict, chosen: list[str], workdir: Path):
        """Each kept quantizer's cost, alone against the file without fallback, and all of them together: bytes
        and median latency on the target's runtime at verify's batch sizes (interleaved rounds, one process, a
        few files at a time beside the file without fallback; ``grouped_costs``)."""
        from deploycraft.runtime.bench import physical_cores

        cfg, data = self.config, ctx.data
        verify = next((s for s in ctx.recipe.stages if s.type == "verify" and s.enabled), None)
        batch_sizes = list(verify.batch_sizes) if verify is not None else [1]
        threads = (verify.threads if verify is not None else None) or physical_cores()  # as verify times
        folder = workdir / "fallback" / (STATE_SUFFIX[target].lstrip("_") or "onnxruntime")
        folder.mkdir(parents=True, exist_ok=True)
        files = {"none": path}
        variants = [(name, [name]) for name in chosen] + ([(ALL_KEPT, chosen)] if len(chosen) > 1 else [])
        for i, (name, kept) in enumerate(variants):
            variant = copy.deepcopy(built.module)
            sensitivity.apply_fallback(variant, kept)
            files[name] = folder / (f"{i:02d}.onnx" if name != ALL_KEPT else "all.onnx")
            export_deployable(
                variant, "int8", files[name], data.sample_input(2), target, cfg.opset, metadata=metadata,
                ranges=built.ranges,
            )  # fmt: skip
        runtime = TARGET_RUNTIME[target]
        deltas, base_ms = grouped_costs(
            lambda f: onnx_runner(runtime, f, threads=threads), files, data.sample_input, batch_sizes
        )
        costs = {
            name: {
                "bytes": files[name].stat().st_size - path.stat().st_size,
                "latency_ms": deltas[name],
                "file": files[name].relative_to(workdir).as_posix(),
            }
            for name, _ in variants
        }
        out = {"runtime": runtime, "batch_sizes": batch_sizes, "base_ms": base_ms, "base_bytes": path.stat().st_size,
               "group": min(COST_GROUP, len(variants)), "per_unit": {n: costs[n] for n in chosen}}  # fmt: skip
        if ALL_KEPT in costs:
            out["all"] = costs[ALL_KEPT]
        return out

    def _qat(self, ctx, model, ptq_module, target: str, workdir: Path):
        """PTQ's calibrated simulation fine-tuned with KD (and a plain-QAT control); held-out top-1 of each."""
        cfg, data = self.config, ctx.data
        q, augmentation_from = qat_settings(ctx.recipe, cfg.qat)
        sub = STATE_SUFFIX[target].lstrip("_")
        metrics: dict[str, Any] = {
            "augmentation": {"crop_padding": q.crop_padding, "hflip": q.hflip, "from": augmentation_from},
            "epochs": q.epochs,
            "lr": q.lr,
            "schedule": q.schedule,
            "learnable_scales": q.learnable_scales,
            "bn_fold": q.bn_fold,
            "distill": q.distill.enabled,
            "feature_weight": q.distill.feature_weight if q.distill.enabled else 0.0,
            **({"alpha": q.distill.alpha, "temperature": q.distill.temperature} if q.distill.enabled else {}),
        }
        world = ctx.world
        metrics["top1_fp32"] = top1(torch_predictor(model), data, 256, "top-1 FP32", world)
        metrics["top1_ptq"] = top1(torch_predictor(ptq_module), data, 256, "top-1 PTQ (simulated)", world)
        control_module = copy.deepcopy(ptq_module) if q.distill.enabled and q.distill.control else None
        teacher = None
        if q.distill.enabled:
            if q.distill.teacher == "before_pruning" and ctx.reference_dir is not None:
                teacher, metrics["teacher"] = ctx.load_shared_model(ctx.reference_dir), "the model before pruning"
            else:
                teacher, metrics["teacher"] = copy.deepcopy(model), "the FP32 model being quantized"
            metrics["top1_teacher"] = top1(torch_predictor(teacher), data, 256, "top-1 teacher", world)
            if q.distill.feature_weight > 0:  # preflight checked the recipe's model; this checks the simulation
                check_feature_kd(
                    ptq_module, teacher, ctx.recipe.model.arch, "stages.quantize.qat.distill.feature_weight"
                )
        log(f"  {target}: FP32 top-1 {metrics['top1_fp32']:.4f}, PTQ (simulated) {metrics['top1_ptq']:.4f}")
        qmodel = ptq_module
        bn_pairs: dict = {}
        if q.bn_fold == "after":
            fold_bn(model, bn_pairs)
            names = {n for n, m in qmodel.named_modules() if isinstance(m, QuantConv2d)}
            metrics["live_bn"] = len(names & set(bn_pairs))
            metrics["frozen_bn"] = sum(isinstance(m, ChannelAffine) for m in qmodel.modules())
        label = "QAT+KD" if teacher is not None else "QAT"
        history = qat_finetune(
            qmodel, data, q, workdir / "qat" / sub, ctx.recipe.seed, teacher, label=label, device=ctx.device,
            world=world, bn_pairs=bn_pairs,
        )  # fmt: skip
        metrics["top1_qat"] = history[-1]["val_top1"]
        metrics["history"] = history
        if control_module is not None:
            ctrl = qat_finetune(
                control_module, data, q, workdir / "qat-control" / sub, ctx.recipe.seed, None, "QAT control",
                ctx.device, world, bn_pairs,
            )  # fmt: skip
            metrics["top1_qat_control"] = ctrl[-1]["val_top1"]
            metrics["control_history"] = ctrl
        log(
            f"  {target}: {label} top-1 {metrics['top1_qat']:.4f}"
            + (f", plain QAT {metrics['top1_qat_control']:.4f}" if "top1_qat_control" in metrics else "")
            + f" (PTQ {metrics['top1_ptq']:.4f}, FP32 {metrics['top1_fp32']:.4f})"
        )
        return qmodel.eval(), metrics

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        q = report["stages"].get("quantize")
        if not q:
            return []
        lines = ["", "## Quantization", ""]
        pct = f", {q['percentile']} %" if q.get("percentile") else ""
        method = "PTQ, then QAT," if q.get("method") == "qat" else "PTQ"
        corrected = ", biases corrected for the mean shift of each layer's output" if q.get("bias_correction") else ""
        lines.append(
            f"{method} ({q['calibrator']} calibrator{pct}{corrected}), symmetric per-channel weights; calibration: "
            f"{q['calibration']}."
        )
        for target, t in q.get("targets", {q["target"]: q}).items():
            line = (
                f"For {target}: {t['activation_dtype']} activations, {t['activation_quantizers']} activation and "
                f"{t['weight_quantizers']} weight quantizers"
            )
            proof = t.get("int8_execution")
            if proof:
                adds = f", {proof['int8_adds']} QLinearAdd" if "int8_adds" in proof else ""
                line += (
                    f"; {proof['runtime']}'s own graph runs {proof['int8_convs']} of {proof['convs']} convs in INT8"
                    f"{adds} (the placement quantizes {proof['expected_int8_convs']})"
                )
                clip = proof.get("clip_only")
                if clip and (clip["runtime"] or clip["simulated"]):
                    same = (
                        "as the simulation does"
                        if clip["runtime"] == clip["simulated"]
                        else (f"the simulation at {len(clip['simulated'])} (they differ: {_clip_difference(clip)})")
                    )
                    line += (
                        f"; it fuses {len(clip['runtime'])} conv -> residual add pairs and clips there without "
                        f"rounding, {same}"
                    )
            line += (
                f"; simulation{' (in ' + t['sim_vs_onnx_precision'] + ')' if t.get('sim_vs_onnx_precision') else ''} "
                f"vs deployed file: top-1 agreement {t['sim_vs_onnx_top1_agreement'] * 100:.1f} %."
            )
            lines.append(line)
            if t.get("bias_fitted_channels"):
                fitted = t["bias_fitted_channels"]
                lines.append(
                    f"{len(fitted)} conv channel(s) with all but zero weights had a bias beyond QLinearConv's int32 "
                    f"range: their weight scale was raised so that it fits (coarser weights, the bias exact): "
                    f"{', '.join(fitted[:8])}{' ...' if len(fitted) > 8 else ''}."
                )
            bits = t.get("weight_bits") or {}
            if set(bits) - {"8"}:
                parts = [
                    f"{b} bits in {len(v)} layer(s)" + (f" ({', '.join(v)})" if len(v) <= 3 else "")
                    for b, v in sorted(bits.items(), key=lambda kv: int(kv[0]))
                ]
                lines.append(
                    f"Weights: {'; '.join(parts)}; {t.get('int4_initializers', 0)} stored as INT4; "
                    f"file {t['bytes'] / 1e3:.1f} kB (the verify table gives its accuracy and latency)."
                )
            if t.get("reduce_range"):
                lines.append(
                    "8-bit weights use 7 bits (±63, `reduce_range`): on x86 CPUs without VNNI the INT8 kernels "
                    "add pairs of u8 × s8 products in int16 with saturation, which 7-bit weights never reach."
                )
            h = t.get("held_out")
            if h:
                lines.append(
                    f"Held-out split ({h['images']} images), top-1: FP32 {h['top1_fp32'] * 100:.2f} %, simulated"
                    + (f" (in {h['sim_precision']})" if h.get("sim_precision") else "")
                    + " "
                    f"{h['top1_sim'] * 100:.2f} %, deployed {h['top1_deployed'] * 100:.2f} %; top-1 agreement "
                    f"FP32–simulated {h['fp32_vs_sim'] * 100:.2f} %, simulated–deployed "
                    f"{h['sim_vs_deployed'] * 100:.2f} %, FP32–deployed {h['fp32_vs_deployed'] * 100:.2f} %."
                )
            if t.get("fidelity"):
                lines.append(fidelity.summary_line(t["fidelity"], t.get("runtime", target)))
            for runtime, o in (t.get("other_runtimes") or {}).items():
                lines.extend(_elsewhere_lines(target, runtime, o))
            sens = t.get("sensitivity")
            if sens:
                lines.extend(_sensitivity_lines(sens))
            qat = t.get("qat")
            if qat:
                lines.append(_qat_line(qat))
        for target, why in (q.get("skipped_targets") or {}).items():
            lines.append(f"For {target}: left out of auto — {why}.")
        return lines
