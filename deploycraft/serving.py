"""What a user serves: the shipped deployable's description and a Triton Inference Server model repository.

deploy/deployable.json says which file ships, on which runtime, with which settings and input, and
what verify measured for it. deploy/triton/<name>/ is a model repository for that file: the ONNX
Runtime or OpenVINO backend, the input and output spec, dynamic batching and one CPU instance.
"""

from __future__ import annotations

from typing import Any

BACKEND = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def triton_config(
    name: str, runtime: str, channels: int, size: int, classes: int, max_batch: int, threads: int, precision: str
) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for a CPU deployment of an ONNX file."""
    if runtime == "openvino":
        params = {"INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": "1"}
    else:
        params = {"intra_op_thread_count": str(threads), "inter_op_thread_count": "1"}
    lines = [
        f'name: "{name}"',
        f'backend: "{BACKEND[runtime]}"',
        'default_model_filename: "model.onnx"',
        f"max_batch_size: {max_batch}",
        f'input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {channels}, {size}, {size} ] }} ]',
        f'output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {classes} ] }} ]',
        "dynamic_batching { max_queue_delay_microseconds: 100 }",
        "instance_group [ { kind: KIND_CPU count: 1 } ]",
    ]
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def deployable_description(
    main: str, file: str, runtime: str, precision: str, threads: int, target: str, measured: dict[str, Any] | None
) -> dict[str, Any]:
    out = {
        "model": main,
        "file": file,
        "runtime": runtime,
        "precision": precision,
        "threads": threads,
        "target": target,
        "openvino_precision_hint": ("bf16" if precision == "bf16" else "f32") if runtime == "openvino" else None,
    }
    if measured:
        out["measured"] = {
            k: measured.get(k) for k in ("top1", "latency", "gmacs", "ceiling_fraction") if measured.get(k) is not None
        }
    return out
