"""The recipe: one YAML file, validated by one pydantic schema, drives the whole chain.

Everything a user can set is a field here, with its description; the CLI only fills fields in
(`--set stages.train.epochs=3`). YAML is read with the safe loader only, unknown keys are rejected,
and every problem becomes one `UserError` line naming the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploycraft.errors import UserError


class FieldError(ValueError):
    """A field validator's error with its fix; pydantic supplies where (the field path) it happened."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------


class ModelConfig(Strict):
    arch: str = Field(
        description="Registered architecture, e.g. resnet50 or resnet20; `deploycraft models` lists them."
    )
    num_classes: int = Field(10, ge=1, description="Number of output classes of the classifier.")
    in_chans: int | None = Field(None, ge=1, description="Input channels of the first conv; default: data.channels.")
    weights: Path | None = Field(
        None,
        description="Checkpoint to start from instead of random init: a state dict in torchvision's key "
        "format, or a deploycraft weights file. Loaded with torch.load(weights_only=True). Relative paths "
        "are relative to the working directory.",
    )
    strict: bool = Field(True, description="Require every checkpoint key to match the model (torch strict loading).")
    reset_classifier: bool = Field(
        False,
        description="Drop the checkpoint's classifier and start a new one with num_classes (fine-tuning a "
        "checkpoint to a new label set).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments of the architecture, e.g. {shortcut: A} or "
        "{final_survival_prob: 0.8}.",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from deploycraft.models.registry import model_info

        try:
            model_info(v)
        except UserError as exc:
            raise FieldError(exc.message, exc.fix) from None
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise FieldError(
                f"checkpoint {v} does not exist",
                fix="give the path of a .pt/.pth state dict, or null to start from random init",
            )
        return v


class DataConfig(Strict):
    dataset: Literal["fashion-mnist", "imagefolder", "synthetic"] = Field(
        "fashion-mnist",
        description="fashion-mnist (built-in default), imagefolder (root/<split>/<class>/<image>), or "
        "synthetic (generated images for smoke tests).",
    )
    root: Path | None = Field(
        None,
        description="fashion-mnist: folder with the four .gz files (default: the Debian package folder, "
        "$DEPLOYCRAFT_DATA, the user cache, else download). imagefolder: the folder that holds the splits.",
    )
    train_split: str = Field("train", description="imagefolder: sub-folder used for training and calibration.")
    val_split: str = Field("val", description="imagefolder: sub-folder used for held-out evaluation.")
    image_size: int = Field(32, ge=8, le=1024, description="Model input resolution (square), pixels.")
    channels: Literal[1, 3] = Field(3, description="Model input channels; grey images are replicated to 3.")
    mean: list[float] | None = Field(
        None, description="Per-channel normalization mean (pixels in [0,1]); default: the dataset's own."
    )
    std: list[float] | None = Field(None, description="Per-channel normalization std; default: the dataset's own.")
    crop_pct: float = Field(
        0.875, gt=0, le=1, description="imagefolder: resize the shorter side to image_size/crop_pct, then center-crop."
    )
    train_subset: int | None = Field(
        None, ge=1, description="Use a seeded random subset of this many training images (fast experiments)."
    )
    val_subset: int | None = Field(
        None, ge=1, description="Evaluate on a seeded random subset of this many held-out images."
    )
    calibration: Path | None = Field(
        None,
        description="Calibration images (.npz with uint8 `images` NCHW and `labels`); default: the shipped "
        "calibration/fashion-mnist-train-512.npz for fashion-mnist, else drawn from the training split.",
    )
    download: bool = Field(True, description="fashion-mnist: allow downloading from the official mirror.")
    num_workers: int = Field(0, ge=0, description="imagefolder: decoding worker processes.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.channels:
                raise UserError(
                    f"has {len(v)} values but data.channels is {self.channels}",
                    field=f"data.{name}",
                    fix=f"give one value per channel ({self.channels})",
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UserError("must be positive", field="data.std", fix="use the dataset's per-channel std")
        if self.dataset == "imagefolder":
            if self.root is None:
                raise UserError(
                    "imagefolder needs a root folder",
                    field="data.root",
                    fix="set data.root to the folder that holds the train/val splits",
                )
            if not Path(self.root).is_dir():
                raise UserError(
                    f"folder {self.root} does not exist",
                    field="data.root",
                    fix="set data.root to the folder that holds the splits",
                )
            if not (Path(self.root) / self.val_split).is_dir():
                raise UserError(
                    f"{Path(self.root) / self.val_split} does not exist",
                    field="data.val_split",
                    fix="name the held-out sub-folder of data.root (ImageNet: val)",
                )
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise UserError(
                f"calibration file {self.calibration} does not exist",
                field="data.calibration",
                fix="give an .npz file with `images` and `labels`, or null for the default",
            )
        return self


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------


class StageConfig(Strict):
    enabled: bool = Field(True, description="Set false to skip this stage (its inputs pass through).")


class OptimConfig(Strict):
    """SGD with momentum, warm-up then decay, crop/flip augmentation: shared by train, distill and the
    fine-tuning inside prune."""

    epochs: int = Field(1, ge=0, description="Epochs over the training split; 0 keeps the loaded weights.")
    batch_size: int = Field(128, ge=1, description="Mini-batch size.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate of SGD (reached after the warm-up).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="Use Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay (not applied to BN and biases).")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="LR decay after the warm-up: cosine to 0, step (x gamma at milestones), or constant."
    )
    warmup_epochs: float = Field(0.2, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    milestones: list[float] = Field(
        [0.5, 0.75], description="step schedule: fractions of training at which the LR is multiplied by gamma."
    )
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: LR factor at each milestone.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    crop_padding: int = Field(4, ge=0, description="Augmentation: zero-pad by this many pixels, then random-crop.")
    hflip: bool = Field(True, description="Augmentation: random horizontal flips.")
    eval_each_epoch: bool = Field(True, description="Evaluate top-1 on the held-out split after every epoch.")


class TrainConfig(StageConfig, OptimConfig):
    """Train from scratch, or fine-tune model.weights."""

    type: Literal["train"] = "train"


class FinetuneConfig(OptimConfig):
    """Short recovery training after each pruning step (plain cross-entropy)."""

    lr: float = Field(0.01, gt=0, description="Peak learning rate of SGD (reached after the warm-up).")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    eval_each_epoch: bool = Field(False, description="Evaluate top-1 on the held-out split after every epoch.")


class PruneConfig(StageConfig):
    """Structured channel pruning on torch-pruning's dependency graph: channels coupled through residual
    adds, concatenations, grouped convs and SE gates are removed together. Give exactly one target."""

    type: Literal["prune"] = "prune"
    channel_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Target: remove this fraction of the channels of every prunable layer (0: only remove_blocks).",
    )
    target_macs: float | None = Field(
        None, gt=0, le=1, description="Target: keep at most this fraction of the MACs (0.5 = half), found by search."
    )
    target_params: float | None = Field(
        None, gt=0, le=1, description="Target: keep at most this fraction of the parameters, found by search."
    )
    target_latency_ms: float | None = Field(
        None, gt=0, description="Target: ONNX Runtime CPU p50 latency at latency_batch_size, pruned until met."
    )
    latency_batch_size: int = Field(1, ge=1, description="target_latency_ms: the batch size it is measured at.")
    latency_precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="target_latency_ms: time the FP32 or the INT8 ONNX model; auto = int8 when a later "
        "quantize stage targets onnxruntime-cpu, else fp32.",
    )
    latency_threads: int | None = Field(None, ge=1, description="target_latency_ms: threads; default all cores.")
    importance: Literal["l1", "l2", "bn_scale", "taylor", "fpgm", "random"] = Field(
        "l1",
        description="Channel importance: group L1/L2 magnitude, BN scale (network slimming), first-order "
        "Taylor (from taylor_batches batches), FPGM (geometric median), or random (a baseline).",
    )
    taylor_batches: int = Field(8, ge=1, description="taylor: batches whose loss gradients score the channels.")
    round_to: int | None = Field(
        None,
        ge=1,
        description="Keep every pruned width a multiple of this. Default: 16 before an INT8 "
        "onnxruntime-cpu quantize stage (measured faster than 8 there), else 8.",
    )
    max_layer_ratio: float = Field(
        0.8, gt=0, le=1, description="No layer loses more than this fraction of its channels (global pruning)."
    )
    global_pruning: bool = Field(
        False, description="Rank channels across layers (widths differ per layer) instead of the same ratio per layer."
    )
    prune_stem: bool = Field(False, description="Also prune the stem conv (and the channels coupled to it).")
    steps: int = Field(1, ge=1, description="Iterative schedule: prune in this many steps, fine-tuning in between.")
    remove_blocks: int = Field(
        0,
        ge=0,
        description="Depth pruning first: remove this many residual blocks with an identity shortcut, those whose "
        "removal raises the training loss least. Narrow early stages dominate INT8 time on CPU and channel "
        "rounding cannot shrink them; removing blocks does (benchmarks/prune_round_to.py).",
    )
    block_batches: int = Field(8, ge=1, description="remove_blocks: training batches that score the blocks.")
    block_cost: Literal["activations", "none"] = Field(
        "activations",
        description="remove_blocks: rank blocks by loss increase per element of their input activations "
        "(on CPU, high-resolution narrow blocks cost the most per MAC), or by loss increase alone.",
    )
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune after each pruning step (null: none; use a distill stage after prune)."
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = [
            n
            for n in ("channel_ratio", "target_macs", "target_params", "target_latency_ms")
            if getattr(self, n) is not None
        ]
        if len(targets) != 1:
            raise ValueError(
                f"give exactly one of channel_ratio, target_macs, target_params, target_latency_ms "
                f"(got {', '.join(targets) or 'none'})"
            )
        return self

    @property
    def target(self) -> tuple[str, float]:
        for n in ("channel_ratio", "target_macs", "target_params", "target_latency_ms"):
            if getattr(self, n) is not None:
                return n, getattr(self, n)
        raise AssertionError("validated to have one target")


class TeacherConfig(ModelConfig):
    weights: Path = Field(description="The teacher's trained checkpoint (required).")


class DistillConfig(StageConfig, OptimConfig):
    """Knowledge distillation (Hinton et al. 2015): the student (the current model) learns from the teacher's
    softened outputs and, optionally, its stage features."""

    type: Literal["distill"] = "distill"
    epochs: int = Field(2, ge=1, description="Epochs of distillation.")
    lr: float = Field(0.02, gt=0, description="Peak learning rate of SGD (reached after the warm-up).")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    teacher: TeacherConfig | None = Field(
        None, description="Teacher model; default: the model before pruning (the train stage's output)."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft (KD) loss; 1 - alpha weights the labels.")
    feature_weight: float = Field(
        0.0, ge=0, description="Weight of feature distillation on stage outputs (1x1 adapters where widths differ)."
    )
    control: bool = Field(
        False, description="Also fine-tune a copy with plain cross-entropy for the same epochs and report it."
    )


class QuantizeConfig(StageConfig):
    """INT8 quantization: a calibrated Q/DQ simulation in torch, written as a QDQ ONNX for the target."""

    type: Literal["quantize"] = "quantize"
    method: Literal["ptq"] = Field("ptq", description="ptq: post-training quantization from calibration data.")
    target: Literal["onnxruntime-cpu", "tensorrt"] = Field(
        "onnxruntime-cpu",
        description="Deployment runtime. onnxruntime-cpu: asymmetric U8 activations, S8 per-channel weights, "
        "Q/DQ on conv outputs and both residual-add inputs (QLinearConv/QLinearAdd). tensorrt: symmetric S8 "
        "everywhere, Q/DQ on conv inputs and the residual skip input only (conv+add+relu fusion).",
    )
    calibrator: Literal["max", "percentile", "mse"] = Field(
        "percentile", description="Activation range: observed max, a percentile of |x|, or the MSE-optimal clip."
    )
    percentile: float = Field(99.99, gt=50, le=100, description="percentile calibrator: the percentile kept.")
    num_calibration: int = Field(512, ge=1, description="Calibration images used.")
    batch_size: int = Field(64, ge=1, description="Calibration batch size.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales (else one per tensor).")
    reduce_range: bool = Field(
        False, description="7-bit weights, for x86 CPUs without VNNI where U8S8 products can saturate."
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset of the QDQ model (per-channel Q/DQ needs >= 13).")


class ExportConfig(StageConfig):
    """FP32 ONNX with BatchNorm folded into the convs, checked against torch."""

    type: Literal["export"] = "export"
    format: Literal["onnx"] = Field("onnx", description="Export format.")
    opset: int = Field(17, ge=13, le=21, description="ONNX opset.")
    dynamic_batch: bool = Field(True, description="Make the batch dimension dynamic.")
    rtol: float = Field(1e-4, gt=0, description="Largest allowed max|onnx - torch| / max|torch| on a check batch.")


class VerifyConfig(StageConfig):
    """Accuracy of every model through its own runtime, latency, and the gates."""

    type: Literal["verify"] = "verify"
    backends: list[Literal["torch", "onnxruntime"]] = Field(
        ["torch", "onnxruntime"], description="Runtimes to measure (torch: the FP32 reference in eager mode)."
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1], min_length=1, description="Batch sizes for latency; the first is the one the gates use."
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads for every runtime; default: all cores.")
    warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    repeats: int = Field(100, ge=3, description="Timed runs per model and batch size (medians, p90, p99).")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for the accuracy pass.")
    max_accuracy_drop: float | None = Field(
        0.01,
        ge=0,
        le=1,
        description="Gate: largest top-1 drop of any deployable vs the FP32 torch model (fraction: 0.01 = 1 point).",
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="Gate: largest p50 latency of the main deployable at batch_sizes[0]."
    )
    min_speedup: float | None = Field(
        None, gt=0, description="Gate: smallest p50 speed-up of the main deployable over the FP32 torch model."
    )
    compare_unpruned: bool = Field(
        True,
        description="After a prune stage, also export and time the unpruned model the same way (FP32 "
        "ONNX, and INT8 with the quantize stage's settings) so the report shows what pruning bought.",
    )


StageUnion = Annotated[
    Union[TrainConfig, PruneConfig, DistillConfig, QuantizeConfig, ExportConfig, VerifyConfig],
    Field(discriminator="type"),
]

# Where each stage may stand in the chain; equal ranks may come in either order.
STAGE_RANK = {"train": 0, "prune": 1, "distill": 2, "quantize": 3, "export": 3, "tensorrt": 4, "verify": 5}
ORDER_TEXT = "train -> prune -> distill -> quantize/export -> tensorrt -> verify"


class Recipe(Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Recipe name; names the run folder artifacts/<name>/<run id>/.",
    )
    description: str = Field("", description="Free text, copied into the report.")
    seed: int = Field(0, description="Seed of model init, data order, augmentation and subsets.")
    threads: int | None = Field(None, ge=1, description="Torch intra-op threads for training; default: all cores.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where torch trains, distills and fine-tunes (and, on cuda, where verify also times the FP32 "
        "model): auto = cuda when a GPU is visible. Calibration, export and ONNX Runtime run on the CPU.",
    )
    model: ModelConfig = Field(description="The architecture and where its weights come from.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, resolution and normalization.")
    stages: list[StageUnion] = Field(min_length=1, description="The stages, run in this order.")

    @model_validator(mode="after")
    def _check_chain(self) -> Recipe:
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.type in seen:
                raise UserError(
                    f"a second {st.type} stage (the first is stages.{seen[st.type]})",
                    field=f"stages.{i}",
                    fix="keep one stage of each type",
                )
            for j, earlier in enumerate(self.stages[:i]):
                if STAGE_RANK[earlier.type] > STAGE_RANK[st.type]:
                    raise UserError(
                        f"{st.type} cannot come after {earlier.type} (stages.{j})",
                        field=f"stages.{i}",
                        fix=f"order the stages as {ORDER_TEXT}",
                    )
            seen[st.type] = i
        active = {s.type for s in self.stages if s.enabled}
        for i, st in enumerate(self.stages):
            if isinstance(st, DistillConfig) and st.enabled and st.teacher is None and "prune" not in active:
                raise UserError(
                    "distill has no teacher: without a prune stage before it the model before pruning is the "
                    "student itself",
                    field=f"stages.{i}.teacher",
                    fix="add a prune stage before distill, or set stages.distill.teacher to a trained checkpoint",
                )
        trains = any(isinstance(s, TrainConfig) and s.enabled and s.epochs > 0 for s in self.stages)
        if not trains and self.model.weights is None and active & {"quantize", "export", "verify"}:
            raise UserError(
                "the model would be untrained: no enabled train stage with epochs > 0 and no checkpoint",
                field="model.weights",
                fix="add a train stage, or set model.weights to a trained checkpoint",
            )
        if "train" in active and self.data.dataset == "imagefolder":
            if not (Path(self.data.root) / self.data.train_split).is_dir():
                raise UserError(
                    f"the train stage needs {Path(self.data.root) / self.data.train_split}",
                    field="data.train_split",
                    fix="name the training sub-folder of data.root, or disable the train stage "
                    "(stages.train.enabled=false)",
                )
        return self

    def stage(self, type_: str) -> StageConfig | None:
        return next((s for s in self.stages if s.type == type_), None)


# --------------------------------------------------------------------------------------------
# loading, overrides, errors
# --------------------------------------------------------------------------------------------


class _NoDuplicatesLoader(yaml.SafeLoader):
    """Safe loading that also rejects duplicate keys (a silent override in plain YAML)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoDuplicatesLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}" if mark else ""
        problem = exc.problem or str(exc)
        if "could not determine a constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip().strip("'")
            raise UserError(
                f"{where}: YAML tag {tag} is not allowed (recipes are plain data; nothing is executed)",
                source=source,
                fix="remove the tag and write the value as plain YAML",
            ) from None
        raise UserError(f"{where}: {problem}", source=source, fix="fix the YAML at that line") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}invalid YAML ({problem})", source=source, fix="fix the YAML syntax there") from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set path=value``. Path parts are keys, list indices, or a stage type under stages."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} has no '='", fix="write --set path.to.field=value")
    path, value_text = assignment.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {assignment!r} names no field", fix="write --set path.to.field=value")
    value = _parse_value(value_text)
    node: Any = raw
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        here = ".".join(parts[: k + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, here)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(
                f"--set {path}: {'.'.join(parts[:k])} is a value, not a section",
                fix="check the field path with `deploycraft schema`",
            )


def _list_index(items: list, part: str, here: str) -> int:
    if re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise UserError(
                f"--set {here}: index {idx} is out of range ({len(items)} entries)",
                fix="use an existing index or the stage type, e.g. stages.train.epochs",
            )
        return idx
    matches = [i for i, it in enumerate(items) if isinstance(it, dict) and it.get("type") == part]
    if len(matches) != 1:
        raise UserError(
            f"--set {here}: no single stage of type {part!r}",
            fix="use a stage index (stages.0) or the type of a stage in the recipe",
        )
    return matches[0]


def _loc_to_path(loc: tuple, raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for i, item in enumerate(loc):
        # Discriminated unions add the tag ('train') after the list index: not a real field.
        if (
            i > 0
            and isinstance(loc[i - 1], int)
            and parts[:1] == ["stages"]
            and isinstance(item, str)
            and item in STAGE_RANK
            and (not isinstance(node, dict) or item not in node)
        ):
            continue
        parts.append(str(item))
        if isinstance(node, dict):
            node = node.get(item)
        elif isinstance(node, list) and isinstance(item, int) and -len(node) <= item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


def _fix_for(err: dict) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "remove it or check its spelling (`deploycraft schema` lists every field)"
    if kind == "missing":
        return "add it"
    if kind == "literal_error":
        return f"use one of {ctx.get('expected', 'the allowed values')}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"set type to one of {', '.join(t for t in STAGE_RANK if t in _STAGE_TYPES)}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of type {kind.split('_')[0]}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "give a value in range"
    return "see `deploycraft schema` for the field's type and range"


_STAGE_TYPES = {cls.model_fields["type"].default for cls in get_args(get_args(StageUnion)[0])}


def validation_error(exc: ValidationError, raw: Any, source: str) -> UserError:
    errors = exc.errors(include_url=False)
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, UserError):
            cause.source = source
            return cause
    err = errors[0]
    path = _loc_to_path(tuple(err["loc"]), raw) or "recipe"
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return UserError(str(cause), field=path, fix=cause.fix, source=source)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return UserError(msg + more, field=path, fix=_fix_for(err), source=source)


def build_recipe(raw: Any, source: str = "recipe") -> Recipe:
    if raw is None:
        raise UserError("the recipe is empty", source=source, fix="write at least name, model.arch and stages")
    if not isinstance(raw, dict):
        raise UserError(
            f"the recipe must be a mapping of fields, got {type(raw).__name__}",
            source=source,
            fix="start with `name:`, `model:` and `stages:` at the top level",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, raw, source) from None
    except UserError as exc:
        exc.source = exc.source or source
        raise


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"recipe file {p} does not exist", fix="give the path of a recipe YAML, e.g. recipes/resnet50_int8.yaml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {p}: {exc}", fix="give a readable UTF-8 YAML file") from None
    raw = parse_yaml(text, str(p))
    if raw is None:
        raise UserError("the recipe is empty", source=str(p), fix="write at least name, model.arch and stages")
    if not isinstance(raw, dict):
        raise UserError(
            f"the recipe must be a mapping of fields, got {type(raw).__name__}",
            source=str(p),
            fix="start with `name:`, `model:` and `stages:` at the top level",
        )
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_recipe(raw, str(p))


def json_schema() -> dict:
    return Recipe.model_json_schema()
