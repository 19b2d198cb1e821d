"""The configuration pieces shared by the recipe and the stages: strict pydantic models, the model and
data sections, the base of every stage's config, and the optimizer settings that train, distill and
prune's fine-tuning share.

Every model forbids unknown keys, takes no lossy coercions (``epochs: true`` or ``hflip: "yes"`` are
errors, not 1 and True) and no infinite or NaN floats; paths are the one field type read from strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deploycraft.errors import UserError

# Recipes come from YAML, where a path is a string: the one lax conversion allowed in strict models.
FilePath = Annotated[Path, Field(strict=False)]


class FieldError(ValueError):
    """A validator's error with its fix; pydantic supplies where (the field path) it happened, and a
    model-level validator names the field inside the model with ``subfield``."""

    def __init__(self, message: str, fix: str, subfield: str | None = None):
        super().__init__(message)
        self.fix = fix
        self.subfield = subfield


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False, use_attribute_docstrings=False
    )


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------


class ModelConfig(Strict):
    arch: str = Field(
        description="Registered architecture, e.g. resnet50 or resnet20; `deploycraft models` lists them."
    )
    num_classes: int = Field(10, ge=1, description="Number of output classes of the classifier.")
    in_chans: int | None = Field(
        None,
        ge=1,
        description="Input channels of the first conv; default: data.channels, the only value allowed (the data "
        "gives the model data.channels channels; a checkpoint's first conv is adapted between 1 and 3 on loading).",
    )
    weights: FilePath | None = Field(
        None,
        description="Checkpoint to start from instead of random init: a state dict in torchvision's key "
        "format, or a deploycraft weights file. Loaded with torch.load(weights_only=True). Relative paths "
        "are relative to the working directory.",
    )
    strict: bool = Field(True, description="Require every checkpoint key to match the model (torch strict loading).")
    reset_classifier: bool = Field(
        False,
        description="Drop the checkpoint's classifier and start a new one with num_classes (fine-tuning a "
        "checkpoint to a new label set): a train stage with epochs >= 1, or a distill stage with a teacher, must "
        "then train it.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments of the architecture, e.g. {shortcut: A} or "
        "{final_survival_prob: 0.8}; not the section's own fields (num_classes, in_chans: set those beside kwargs).",
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

    @field_validator("kwargs")
    @classmethod
    def _no_model_fields_in_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = [k for k in v if k in cls.model_fields]
        if clash:
            one = len(clash) == 1
            raise FieldError(
                f"{', '.join(clash)} {'is a field' if one else 'are fields'} of this model section itself, not "
                f"{'an extra constructor argument' if one else 'extra constructor arguments'} (in kwargs "
                f"{'it' if one else 'they'} would silently override the section's value)",
                fix=f"remove {', '.join(clash)} from kwargs and set {'it' if one else 'them'} beside kwargs, "
                f"e.g. model.{clash[0]}",
            )
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: Path | None) -> Path | None:
        if v is not None and Path(v).is_dir():
            raise FieldError(f"checkpoint {v} is a directory", fix="give the path of a .pt/.pth state dict file")
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
    root: FilePath | None = Field(
        None,
        description="fashion-mnist: the folder with the four .gz files, used alone (it is an error if they are "
        "missing or damaged there); default: $DEPLOYCRAFT_DATA/fashion-mnist, the Debian package folder, the user "
        "cache, else download. imagefolder: the folder that holds the splits.",
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
    calibration: FilePath | None = Field(
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
            self._check_splits_apart()
        if self.calibration is not None and Path(self.calibration).is_dir():
            raise UserError(
                f"calibration file {self.calibration} is a directory",
                field="data.calibration",
                fix="give an .npz file with `images` and `labels`, or null for the default",
            )
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise UserError(
                f"calibration file {self.calibration} does not exist",
                field="data.calibration",
                fix="give an .npz file with `images` and `labels`, or null for the default",
            )
        return self

    def _check_splits_apart(self) -> None:
        """The held-out split is not the training split, nor inside it, nor holding it (however the paths are
        spelt: `train`, `train/.`, an absolute path, a link): the gates and the shipped top-1 would be measured
        on images the model was trained on."""
        train_dir, val_dir = Path(self.root) / self.train_split, Path(self.root) / self.val_split
        if not train_dir.is_dir():
            return  # no training split (a run without a train stage): nothing to overlap
        train, val = train_dir.resolve(), val_dir.resolve()
        if train == val:
            how = "is also the training split" + ("" if val_dir == train_dir else f" {train_dir}")
        elif train in val.parents:
            how = f"lies inside the training split {train_dir}"
        elif val in train.parents:
            how = f"holds the training split {train_dir}"
        else:
            return
        raise UserError(
            f"{val_dir} {how}: the held-out accuracy (the gates, the shipped top-1) would be "
            "measured on training images",
            field="data.val_split",
            fix="name a held-out sub-folder of data.root apart from data.train_split (ImageNet: val)",
        )


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


class ParallelOptimConfig(OptimConfig):
    """The optimizer settings of a stage that trains data-parallel under torchrun (train, distill): every
    process takes its part of each global batch (docs/design.md, "Data-parallel runs")."""

    batch_size: int = Field(
        128,
        ge=1,
        description="Mini-batch size. Global: a data-parallel run (torchrun, N processes) splits every batch "
        "over the N processes (batch_size / N images each), so batch_size, lr and the schedule mean the same "
        "for any N.",
    )
    lr: float = Field(
        0.1,
        gt=0,
        description="Peak learning rate of SGD (reached after the warm-up), for the global batch_size: not "
        "scaled with the number of processes.",
    )
    sync_batchnorm: bool = Field(
        False,
        description="Data-parallel runs on GPUs: BatchNorm statistics over the whole global batch (torch's "
        "SyncBatchNorm) instead of each process's part. CUDA only; a single process ignores it.",
    )
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off",
        description="CUDA only: mixed precision (torch.autocast; fp16 with a gradient scaler). Weights, "
        "optimizer and checkpoint stay FP32.",
    )
    channels_last: bool = Field(
        False, description="CUDA only: model and batches in channels_last (NHWC) memory, what tensor cores read."
    )
