"""The skip-connection model zoo: `create_model(name, num_classes=..., in_chans=...)`."""

from deploycraft.models.registry import create_model, is_registered, list_models, model_info, register_model

__all__ = ["create_model", "is_registered", "list_models", "model_info", "register_model"]
