"""The stages, registered by name; importing this package registers all of them."""

from deploycraft.stages import distill, export, prune, quantize, train, verify  # noqa: E402,F401,I001 (registration)
from deploycraft.stages.base import STAGES, Stage, StageOutput, register_stage

__all__ = ["STAGES", "Stage", "StageOutput", "register_stage"]
