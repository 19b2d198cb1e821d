"""The stages, registered by name; importing this package registers all of them."""

from deploycraft.stages import export, quantize, train, verify  # noqa: F401,E402  (registration)
from deploycraft.stages.base import STAGES, Stage, StageOutput, register_stage

__all__ = ["STAGES", "Stage", "StageOutput", "register_stage"]
