"""Imports every model family so that their entrypoints register themselves."""

from deploycraft.models import resnet  # noqa: F401
