"""Imports every model family module so that their entrypoints register themselves.

Every module in deploycraft/models/ other than the infrastructure below is a family (one file per
family); adding a family is adding its file.
"""

from __future__ import annotations

import importlib
import pkgutil

import deploycraft.models as _pkg

INFRASTRUCTURE = {"base", "io", "layers", "profile", "registry", "zoo"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__)):
    if _mod not in INFRASTRUCTURE:
        importlib.import_module(f"deploycraft.models.{_mod}")
