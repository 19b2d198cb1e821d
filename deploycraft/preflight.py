"""Checks before any stage runs: the files a recipe names and the model it builds.

`deploycraft validate` and `deploycraft run` run the same checks (the schema, then these), so whatever
`validate` accepts, `run` does not reject later for the same reason. Each stage adds its own through
``Stage.preflight``; the helpers here build the model once and read the user's files once.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from deploycraft.config import ModelConfig
from deploycraft.errors import UserError
from deploycraft.progress import log

if TYPE_CHECKING:
    from deploycraft.recipe import Recipe


def build_model(cfg: ModelConfig, in_chans: int, field: str, device: str = "meta") -> nn.Module:
    """The architecture of ``cfg`` with its kwargs; on the meta device unless weights must be loaded."""
    from deploycraft.models.registry import create_model

    kwargs = {"num_classes": cfg.num_classes, "in_chans": cfg.in_chans or in_chans, **cfg.kwargs}
    try:
        with torch.device(device):
            return create_model(cfg.arch, **kwargs)
    except TypeError as exc:
        raise UserError(
            f"{cfg.arch} does not accept these arguments ({exc})",
            field=f"{field}.kwargs",
            fix="remove the arguments the architecture does not take (see its entry in deploycraft/models/)",
        ) from None
    except (ValueError, AssertionError) as exc:
        raise UserError(
            f"{cfg.arch}: {exc}", field=f"{field}.kwargs", fix="use values the architecture accepts"
        ) from None
    except RecursionError:
        raise UserError(
            f"{cfg.arch}: the arguments nest too deeply", field=f"{field}.kwargs", fix="flatten them"
        ) from None


class Preflight:
    def __init__(self, recipe: Recipe, network: bool = True):
        self.recipe = recipe
        self.network = network  # validate does not download; run may

    @property
    def in_chans(self) -> int:
        return self.recipe.model.in_chans or self.recipe.data.channels

    @cached_property
    def model(self) -> nn.Module:
        return build_model(self.recipe.model, self.in_chans, "model")

    def build(self, cfg: ModelConfig, field: str) -> nn.Module:
        return build_model(cfg, self.in_chans, field)

    def check_checkpoint(self, cfg: ModelConfig, field: str) -> None:
        """Load the checkpoint into a real build of the model, as the run will: shapes, keys, NaNs."""
        if cfg.weights is None:
            return
        from deploycraft.models.io import load_checkpoint

        model = build_model(cfg, self.in_chans, field, device="cpu")
        reset = getattr(cfg, "reset_classifier", False)
        load_checkpoint(model, Path(cfg.weights), strict=cfg.strict, reset_classifier=reset, field=f"{field}.weights")
        if not cfg.strict:
            self._check_overlap(model, Path(cfg.weights), field)

    @staticmethod
    def _check_overlap(model: nn.Module, path: Path, field: str) -> None:
        """strict=false loads the keys that match: a checkpoint of which none matches beyond the classifier
        would leave the model as initialised, and the run would ship an untrained network as loaded."""
        from deploycraft.models.io import _unwrap, read_checkpoint

        state = _unwrap(read_checkpoint(path, f"{field}.weights"), f"{field}.weights")
        own = model.state_dict()
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        prefix = next((n + "." for n, m in model.named_modules() if m is head), None) if head is not None else None
        body = [k for k in own if not (prefix and k.startswith(prefix)) and own[k].is_floating_point()]
        loaded = [k for k in body if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
        if body and not loaded:
            shown = ", ".join(list(state)[:3]) + (", ..." if len(state) > 3 else "")
            raise UserError(
                f"none of the checkpoint's {len(state)} key(s) ({shown}) matches a weight of {type(model).__name__} "
                f"outside its classifier: {field}.strict=false would leave the model untrained",
                field=f"{field}.weights",
                fix=f"check {field}.arch and the checkpoint (its keys must name the model's layers)",
            )

    @cached_property
    def removable_blocks(self) -> int | None:
        """At most how many residual blocks the recipe's model can lose (prune's remove_blocks): counted on
        the meta-device build, without values; None where the architecture cannot be probed there."""
        from deploycraft.pruning import removable_blocks

        d = self.recipe.data
        try:
            return len(removable_blocks(self.model, (self.in_chans, d.image_size, d.image_size), structural=True))
        except Exception:  # noqa: BLE001 - an op without a meta kernel: the prune stage counts them itself
            return None

    def _class_split(self) -> Path:
        """The ImageFolder split whose class folders are the labels: the training split, else the held-out one."""
        d = self.recipe.data
        return Path(d.root) / (d.train_split if (Path(d.root) / d.train_split).is_dir() else d.val_split)

    def data_classes(self) -> int | None:
        d = self.recipe.data
        if d.dataset in ("fashion-mnist", "synthetic"):
            return 10
        from deploycraft.data.imagefolder import find_classes

        return len(find_classes(self._class_split()))

    def check_classes(self) -> None:
        n = self.data_classes()
        if n is not None and self.recipe.model.num_classes < n:
            empty = ""
            if self.recipe.data.dataset == "imagefolder":
                from deploycraft.data.imagefolder import empty_classes

                split = self._class_split()
                folders = [str(split / name) for name in empty_classes(split)]
                if folders:
                    shown = ", ".join(folders[:5]) + (f", ... ({len(folders)} in all)" if len(folders) > 5 else "")
                    verb = "holds" if len(folders) == 1 else "hold"
                    empty = f": {split} has {n} class folders and {shown} {verb} no images"
            raise UserError(
                f"is {self.recipe.model.num_classes} but the data has {n} classes{empty}",
                field="model.num_classes",
                fix=("remove the empty class folder(s), or " if empty else "")
                + f"set model.num_classes: {n}"
                + (" (and model.reset_classifier: true for a checkpoint)" if self.recipe.model.weights else ""),
            )

    def check_data(self) -> None:
        d = self.recipe.data
        if d.dataset == "fashion-mnist":
            from deploycraft.data import fashion_mnist

            if self.network or not d.download or d.root is not None:
                fashion_mnist.locate(d.root, d.download)
            # else: validate does not download; the run will, or say why it cannot
        if d.dataset == "imagefolder" and (Path(d.root) / d.train_split).is_dir():
            from deploycraft.data.imagefolder import check_split_classes

            check_split_classes(Path(d.root) / d.train_split, Path(d.root) / d.val_split)
        if d.calibration is not None:
            from deploycraft.data import load_calibration_file

            images, _ = load_calibration_file(Path(d.calibration))
            if images.shape[-2:] != (d.image_size, d.image_size):
                log(
                    f"[yellow]warning:[/] data.calibration: the images are {images.shape[-1]}x{images.shape[-2]} "
                    f"and the model takes {d.image_size}x{d.image_size}: they will be resized (bilinear)"
                )

    def run(self) -> None:
        """Every check, in chain order: the data, the starting model, then each enabled stage's."""
        from deploycraft.stages import STAGES

        self.check_data()
        STAGES["init"].preflight(self, -1)
        for i, st in enumerate(self.recipe.stages):
            if st.enabled:
                STAGES[st.type].preflight(self, i)
