"""The names of the models a run measures and ships: one enum, used by verify, the report and the CLI."""

from __future__ import annotations

from enum import Enum


class ModelName(str, Enum):
    """Every model a report can list, in the order the report lists them."""

    FP32_TORCH = "fp32_torch"
    PRUNED_FP32_TORCH = "pruned_fp32_torch"
    DISTILLED_FP32_TORCH = "distilled_fp32_torch"
    FP32_TORCH_CUDA = "fp32_torch_cuda"
    FP16_TORCH_CUDA = "fp16_torch_cuda"
    BF16_TORCH_CUDA = "bf16_torch_cuda"
    UNPRUNED_FP32_ONNX = "unpruned_fp32_onnx"
    UNPRUNED_INT8_ONNX = "unpruned_int8_onnx"
    UNPRUNED_INT8_OPENVINO = "unpruned_int8_openvino"
    FP32_ONNX = "fp32_onnx"
    INT8_ONNX = "int8_onnx"
    INT8_OPENVINO = "int8_openvino"
    FP16_ONNX = "fp16_onnx"
    AOTI_FP32 = "aoti_fp32"
    AOTI_FP16 = "aoti_fp16"
    AOTI_BF16 = "aoti_bf16"
    TRT_INT8 = "trt_int8"
    TRT_FP16 = "trt_fp16"

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
    ModelName.FP16_TORCH_CUDA: "FP16 torch, CUDA (channels_last)",
    ModelName.BF16_TORCH_CUDA: "BF16 torch, CUDA (channels_last)",
    ModelName.UNPRUNED_FP32_ONNX: "unpruned FP32 ONNX",
    ModelName.UNPRUNED_INT8_ONNX: "unpruned INT8 ONNX",
    ModelName.UNPRUNED_INT8_OPENVINO: "unpruned INT8 ONNX for OpenVINO",
    ModelName.FP32_ONNX: "FP32 ONNX",
    ModelName.INT8_ONNX: "INT8 ONNX",
    ModelName.INT8_OPENVINO: "INT8 ONNX for OpenVINO",
    ModelName.FP16_ONNX: "FP16 ONNX",
    ModelName.AOTI_FP32: "AOTInductor FP32",
    ModelName.AOTI_FP16: "AOTInductor FP16",
    ModelName.AOTI_BF16: "AOTInductor BF16",
    ModelName.TRT_INT8: "TensorRT INT8 engine",
    ModelName.TRT_FP16: "TensorRT FP16 engine",
}
RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "openvino-bf16": "OpenVINO, bf16"}

# The INT8 file each target gets (TensorRT's placement is ONNX Runtime's file name: one INT8 per run),
# its file name in the stage folder, and the unpruned comparison verify builds the same way.
INT8_NAME = {
    "onnxruntime-cpu": ModelName.INT8_ONNX,
    "tensorrt": ModelName.INT8_ONNX,
    "openvino-cpu": ModelName.INT8_OPENVINO,
}
ARTIFACT_FILE = {
    ModelName.FP32_ONNX: "model_fp32.onnx",
    ModelName.INT8_ONNX: "model_int8.onnx",
    ModelName.INT8_OPENVINO: "model_int8_openvino.onnx",
    ModelName.FP16_ONNX: "model_fp16.onnx",
    ModelName.AOTI_FP32: "model_fp32.pt2",
    ModelName.AOTI_FP16: "model_fp16.pt2",
    ModelName.AOTI_BF16: "model_bf16.pt2",
    ModelName.TRT_INT8: "model_int8.plan",
    ModelName.TRT_FP16: "model_fp16.plan",
}
AOTI_NAME = {"fp32": ModelName.AOTI_FP32, "fp16": ModelName.AOTI_FP16, "bf16": ModelName.AOTI_BF16}
TRT_NAME = {"int8": ModelName.TRT_INT8, "fp16": ModelName.TRT_FP16}
UNPRUNED = {
    ModelName.FP32_ONNX: ModelName.UNPRUNED_FP32_ONNX,
    ModelName.INT8_ONNX: ModelName.UNPRUNED_INT8_ONNX,
    ModelName.INT8_OPENVINO: ModelName.UNPRUNED_INT8_OPENVINO,
}


def row_name(model: ModelName | str, runtime: str | None) -> str:
    """The report's name of a model on a runtime: ``int8_onnx`` on its own runtime, else ``int8_onnx@openvino``."""
    return str(model) if runtime is None else f"{model}@{runtime}"


def split_row(name: str) -> tuple[str, str | None]:
    model, _, runtime = name.partition("@")
    return model, runtime or None


# Without an INT8 deployable, the one the latency gates look at: the most optimized the run produced.
MAIN_ORDER = (
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
    (ModelName.UNPRUNED_INT8_OPENVINO, ModelName.INT8_OPENVINO),
)
