"""The names of the models a run measures and ships: one enum, used by verify, the report and the CLI."""

from __future__ import annotations

from enum import Enum


class ModelName(str, Enum):
    """Every model a report can list, in the order the report lists them."""

    FP32_TORCH = "fp32_torch"
    PRUNED_FP32_TORCH = "pruned_fp32_torch"
    DISTILLED_FP32_TORCH = "distilled_fp32_torch"
    FP32_TORCH_CUDA = "fp32_torch_cuda"
    UNPRUNED_FP32_ONNX = "unpruned_fp32_onnx"
    UNPRUNED_INT8_ONNX = "unpruned_int8_onnx"
    FP32_ONNX = "fp32_onnx"
    INT8_ONNX = "int8_onnx"

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    ModelName.FP32_TORCH: "FP32 torch (reference)",
    ModelName.PRUNED_FP32_TORCH: "pruned FP32 torch",
    ModelName.DISTILLED_FP32_TORCH: "distilled FP32 torch",
    ModelName.FP32_TORCH_CUDA: "FP32 torch, CUDA",
    ModelName.UNPRUNED_FP32_ONNX: "unpruned FP32 ONNX",
    ModelName.UNPRUNED_INT8_ONNX: "unpruned INT8 ONNX",
    ModelName.FP32_ONNX: "FP32 ONNX",
    ModelName.INT8_ONNX: "INT8 ONNX",
}

# The deployable the latency gates look at: the most optimized one the run produced.
MAIN_ORDER = (
    ModelName.INT8_ONNX,
    ModelName.FP32_ONNX,
    ModelName.PRUNED_FP32_TORCH,
    ModelName.DISTILLED_FP32_TORCH,
    ModelName.FP32_TORCH,
)
# (before, after) pairs whose speed-up pruning is responsible for.
PRUNING_PAIRS = (
    (ModelName.FP32_TORCH, ModelName.PRUNED_FP32_TORCH),
    (ModelName.UNPRUNED_FP32_ONNX, ModelName.FP32_ONNX),
    (ModelName.UNPRUNED_INT8_ONNX, ModelName.INT8_ONNX),
)
