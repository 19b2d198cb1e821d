"""Render the recipe reference (docs/recipe.md) from the schema, so the docs cannot drift from the code."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from deploycraft.config import DataConfig, ModelConfig
from deploycraft.recipe import ORDER_TEXT, Recipe
from deploycraft.stages import recipe_stages


def _type(annotation: Any, schema: dict) -> str:
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "anyOf" in schema:
        parts = [_type(None, s) for s in schema["anyOf"]]
        return " \\| ".join(p for p in parts)
    if "const" in schema:
        return f"`{schema['const']}`"
    t = schema.get("type", "object")
    if t == "array":
        return f"list of {_type(None, schema.get('items', {}))}"
    if "$ref" in schema:
        return schema["$ref"].split("/")[-1]
    return t


def _rows(model: type[BaseModel], prefix: str, nested: bool = False) -> list[str]:
    schema = model.model_json_schema()
    rows = []
    for name, field in model.model_fields.items():
        prop = schema["properties"].get(name, {})
        if field.is_required():
            default = "required"
        else:
            d = field.get_default(call_default_factory=True)
            default = "`" + json.dumps(d if not isinstance(d, BaseModel) else "…", default=str) + "`"
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation, prop)} | {default} | {field.description or ''} |")
        if nested and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows += _rows(field.annotation, f"{prefix}{name}.", nested)  # a sub-section: its fields, dotted
    return rows


HEADER = "| field | type | default | description |\n|---|---|---|---|"


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "Generated from the schema (`python -m deploycraft.recipe_docs > docs/recipe.md`); "
        "`deploycraft schema` prints the same as JSON Schema. Unknown keys are errors. Any field can be "
        "overridden on the command line: `--set model.num_classes=1000`, `--set stages.train.epochs=3` "
        "(a stage by its type) or `--set stages.0.epochs=3` (by index); values are read as YAML.",
        "",
    ]
    top = [r for r in _rows(Recipe, "") if not r.startswith(("| `model`", "| `data`", "| `stages`"))]
    out += [
        "## Top level",
        "",
        HEADER,
        *top,
        "| `model` | section | required | See below. |",
        "| `data` | section | see below | See below. |",
        f"| `stages` | list | required | The stages, run in order: {ORDER_TEXT.replace('->', '→')} "
        "(each at most once). |",
        "",
    ]
    out += ["## model", "", HEADER, *_rows(ModelConfig, "model."), ""]
    out += ["## data", "", HEADER, *_rows(DataConfig, "data."), ""]
    for stage in recipe_stages():
        cls, type_name = stage.Config, stage.type
        doc = " ".join((cls.__doc__ or "").split())
        rows = [r for r in _rows(cls, "", nested=True) if not r.startswith("| `type`")]
        out += [f"## stage `{type_name}`", "", doc, "", HEADER, *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
