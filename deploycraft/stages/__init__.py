"""The stages, registered by type; importing this package discovers and registers every module in it.

A new stage is a new module here: nothing else needs an edit (see stages/base.py for the contract).
"""

import importlib
import pkgutil

from deploycraft.stages.base import STAGES, Stage, StageOutput, recipe_stages, register_stage

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["STAGES", "Stage", "StageOutput", "recipe_stages", "register_stage"]
