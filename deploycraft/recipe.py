"""The recipe: one YAML file, validated by one pydantic schema, drives the whole chain.

Everything a user can set is a field here, with its description; the CLI only fills fields in
(`--set stages.train.epochs=3`). YAML is read with the safe loader only, unknown keys are rejected,
and every problem becomes one `UserError` line naming the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from deploycraft.config import DataConfig, FieldError, ModelConfig, StageConfig, Strict
from deploycraft.errors import UserError
from deploycraft.stages import STAGES, recipe_stages


def _stage_union():
    """The recipe's stage entries: every registered stage's config, told apart by ``type``."""
    configs = tuple(st.Config for st in recipe_stages())
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007 - a runtime-built union


StageUnion = _stage_union()
ORDER_TEXT = " -> ".join(
    "/".join(st.type for st in recipe_stages() if st.rank == rank)
    for rank in sorted({st.rank for st in recipe_stages()})
)


class Recipe(Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Recipe name; names the run folder artifacts/<name>/<run id>/.",
    )
    description: str = Field("", description="Free text, copied into the report.")
    seed: int = Field(
        0,
        ge=-(2**40),
        le=2**40,
        description="Seed of model init, data order, augmentation and subsets (-2^40 to 2^40: the generators "
        "are seeded with multiples of it, up to 100,003 times, which must stay within torch's 64-bit seeds).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads for training, per process; default: all cores (under torchrun: "
        "OMP_NUM_THREADS, which torchrun sets to 1 when it starts several processes on a machine).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where torch trains, distills and fine-tunes (and, on cuda, where verify also times the FP32 "
        "model): auto = cuda when a GPU is visible. Calibration, export and ONNX Runtime run on the CPU.",
    )
    model: ModelConfig = Field(description="The architecture and where its weights come from.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, resolution and normalization.")
    target: Literal["onnxruntime-cpu", "openvino-cpu", "tensorrt", "auto"] = Field(
        "onnxruntime-cpu",
        description="Deployment target: the runtime the deployables are built for. onnxruntime-cpu: U8 "
        "asymmetric activations with S8 per-channel weights, Q/DQ around every conv and both inputs of each "
        "residual add (ONNX Runtime runs QLinearConv/QLinearAdd). openvino-cpu: the same tensors with "
        "symmetric activations (U8 after ReLU, S8 elsewhere), run by OpenVINO. tensorrt: S8 symmetric "
        "everywhere, Q/DQ on conv inputs and the residual skip input only (TensorRT fuses conv+add+ReLU). "
        "auto: build for every installed CPU runtime, measure every deployable on every runtime at the "
        "recipe's batch sizes, and ship the fastest inside verify's accuracy budget.",
    )
    stages: list[StageUnion] = Field(min_length=1, description="The stages, run in this order.")

    @model_validator(mode="after")
    def _check_channels(self) -> Recipe:
        m, channels = self.model, self.data.channels
        if m.in_chans is not None and m.in_chans != channels:
            raise UserError(
                f"is {m.in_chans} but data.channels is {channels}: the data gives the model {channels}-channel images",
                field="model.in_chans",
                fix="remove model.in_chans (it follows data.channels)"
                + (f", or set data.channels: {m.in_chans}" if m.in_chans in (1, 3) else ""),
            )
        return self

    @model_validator(mode="after")
    def _check_chain(self) -> Recipe:
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.type in seen:
                raise UserError(
                    f"a second {st.type} stage (the first is stages.{seen[st.type]})",
                    field=f"stages.{i}",
                    fix="keep one stage of each type",
                )
            for j, earlier in enumerate(self.stages[:i]):
                if STAGES[earlier.type].rank > STAGES[st.type].rank:
                    raise UserError(
                        f"{st.type} cannot come after {earlier.type} (stages.{j})",
                        field=f"stages.{i}",
                        fix=f"order the stages as {ORDER_TEXT}",
                    )
            seen[st.type] = i
        STAGES["init"].check(self, -1)
        for i, st in enumerate(self.stages):
            STAGES[st.type].check(self, i)
        return self

    def stage(self, type_: str) -> StageConfig | None:
        return next((s for s in self.stages if s.type == type_), None)

    def enabled(self, type_: str) -> bool:
        st = self.stage(type_)
        return st is not None and st.enabled


# --------------------------------------------------------------------------------------------
# loading, overrides, errors
# --------------------------------------------------------------------------------------------


# A recipe is a page of settings: these bounds stop a hostile file (an alias "billion laughs", a
# thousand-level nesting) before it costs memory or a RecursionError, and leave real recipes far inside.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class _NoDuplicatesLoader(yaml.SafeLoader):
    """Safe loading that also rejects duplicate keys (a silent override in plain YAML), merges ``<<: *anchor``
    keys with bounded work, and reads YAML 1.2 floats such as 1e-3 as numbers."""

    def __init__(self, stream):
        super().__init__(stream)
        self._merged_pairs = 0  # key-value pairs copied by merge keys, over the whole document
        self._flattening: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Resolve the merge keys of ``node`` (the YAML merge rule: the mapping's own keys win, then the merged
        mappings in the order listed). One pair per key is kept, and the pairs merges copy are counted over the
        document, so aliases of aliases cannot multiply them (merges are plain data, like the aliases they use)."""
        if not any(k.tag == MERGE_TAG for k, _ in node.value):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:value":  # as SafeLoader does: a plain '=' key
                    key_node.tag = "tag:yaml.org,2002:str"
            return
        if id(node) in self._flattening:
            raise yaml.constructor.ConstructorError(
                None, None, "a merge key (<<) refers to the mapping that contains it", node.start_mark
            )
        self._flattening.add(id(node))
        try:
            own, merged = [], []
            for key_node, value_node in node.value:
                if key_node.tag != MERGE_TAG:
                    if key_node.tag == "tag:yaml.org,2002:value":  # as SafeLoader does: a plain '=' key
                        key_node.tag = "tag:yaml.org,2002:str"
                    own.append((key_node, value_node))
                    continue
                subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for sub in subs:
                    if not isinstance(sub, yaml.MappingNode):
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"a merge key (<<) takes a mapping or a list of mappings, not a {sub.id}",
                            sub.start_mark,
                        )
                    if sub.tag != yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG:  # merging reads no tag: refuse it
                        raise yaml.constructor.ConstructorError(
                            None, None, f"could not determine a constructor for the tag {sub.tag!r}", sub.start_mark
                        )
                    self.flatten_mapping(sub)
                    self._merged_pairs += len(sub.value)
                    if self._merged_pairs > MAX_NODES:
                        raise UserError(
                            f"the recipe's merge keys (<<) copy more than {MAX_NODES:,} values",
                            fix="write the values out instead of merging aliases of aliases",
                        )
                    merged.extend(sub.value)
            seen = {_key_id(k) for k, _ in own}
            kept = []
            for key_node, value_node in merged:
                if _key_id(key_node) not in seen:
                    seen.add(_key_id(key_node))
                    kept.append((key_node, value_node))
            node.value = kept + own
        finally:
            self._flattening.discard(id(node))


def _key_id(node: yaml.Node) -> Any:
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else id(node)


def _construct_mapping(loader: _NoDuplicatesLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merged keys are overridden by the mapping's own, not duplicates of them
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# YAML 1.1, which PyYAML implements, reads 1e-3 and 1.5e3 as strings (its floats need a dot, and a sign
# after the e: 1.0e-3); YAML 1.2 and JSON read them as numbers, as users write learning rates. Plain scalars
# with an exponent resolve to floats here; everything else keeps PyYAML's resolution.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_NoDuplicatesLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+.0123456789"))


class RecipeDumper(yaml.SafeDumper):
    """Writes recipes that the recipe loader reads back as they were: a string such as '1e-3' is quoted."""


RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+.0123456789"))


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=RecipeDumper, sort_keys=False)


def _check_events(text: str, source: str) -> None:
    """Walk YAML's event stream (no recursion, no objects built): refuse deep nesting early."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise UserError(
                    f"line {line}: the YAML nests deeper than {MAX_DEPTH} levels",
                    source=source,
                    fix="a recipe is a few levels of settings: flatten that value",
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_size(obj: Any, source: str) -> None:
    """Count the values as validation would see them, aliases expanded (shared objects counted once per
    use, without expanding them in memory); refuse self-reference and anything over MAX_NODES."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:
            raise UserError(
                "a YAML alias refers to the value that contains it (an endless structure)",
                source=source,
                fix="remove the self-referencing alias",
            )
        active.add(key)
        children = list(x.keys()) + list(x.values()) if isinstance(x, dict) else x
        total = 1
        for c in children:
            total += size(c)
            if total > MAX_NODES:
                raise UserError(
                    f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases repeat what they name)",
                    source=source,
                    fix="write the values out instead of nesting aliases of aliases",
                )
        active.discard(key)
        memo[key] = total
        return total

    size(obj)


def parse_yaml(text: str, source: str) -> Any:
    """Safe-load one YAML document: no tags that build objects, no duplicate keys, bounded size and depth."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise UserError(
            f"the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB", source=source, fix="a recipe is a page of YAML"
        )
    try:
        _check_events(text, source)
        data = yaml.load(text, Loader=_NoDuplicatesLoader)  # noqa: S506 - a SafeLoader subclass
        _check_size(data, source)
        return data
    except UserError as exc:
        exc.source = exc.source or source
        raise
    except RecursionError:
        raise UserError(
            "the YAML nests too deeply to read", source=source, fix="a recipe is a few levels of settings"
        ) from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}" if mark else ""
        problem = exc.problem or str(exc)
        if "could not determine a constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip().strip("'")
            raise UserError(
                f"{where}: YAML tag {tag} is not allowed (recipes are plain data; nothing is executed)",
                source=source,
                fix="remove the tag and write the value as plain YAML",
            ) from None
        raise UserError(f"{where}: {problem}", source=source, fix="fix the YAML at that line") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}invalid YAML ({problem})", source=source, fix="fix the YAML syntax there") from None


def _parse_value(text: str) -> Any:
    """A --set value, read as YAML (numbers, lists, null), with the same bounds as a recipe file."""
    if not text.strip():
        return ""
    try:
        return parse_yaml(text, "--set")
    except UserError as exc:
        if "invalid YAML" in exc.message:
            return text  # not YAML: the plain string
        raise


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set path=value``. Path parts are keys, list indices, or a stage type under stages."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} has no '='", fix="write --set path.to.field=value")
    path, value_text = assignment.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {assignment!r} names no field", fix="write --set path.to.field=value")
    value = _parse_value(value_text)
    node: Any = raw
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        here = ".".join(parts[: k + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, here)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(
                f"--set {path}: {'.'.join(parts[:k])} is a value, not a section",
                fix="check the field path with `deploycraft schema`",
            )


def _list_index(items: list, part: str, here: str) -> int:
    if re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise UserError(
                f"--set {here}: index {idx} is out of range ({len(items)} entries)",
                fix="use an existing index or the stage type, e.g. stages.train.epochs",
            )
        return idx
    matches = [i for i, it in enumerate(items) if isinstance(it, dict) and it.get("type") == part]
    if len(matches) != 1:
        raise UserError(
            f"--set {here}: no single stage of type {part!r}",
            fix="use a stage index (stages.0) or the type of a stage in the recipe",
        )
    return matches[0]


def _loc_to_path(loc: tuple, raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for i, item in enumerate(loc):
        # Discriminated unions add the tag ('train') after the list index: not a real field.
        if (
            i > 0
            and isinstance(loc[i - 1], int)
            and parts[:1] == ["stages"]
            and isinstance(item, str)
            and item in STAGES
            and (not isinstance(node, dict) or item not in node)
        ):
            continue
        parts.append(str(item))
        if isinstance(node, dict):
            node = node.get(item)
        elif isinstance(node, list) and isinstance(item, int) and -len(node) <= item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


def _fix_for(err: dict) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "remove it or check its spelling (`deploycraft schema` lists every field)"
    if kind == "missing":
        return "add it"
    if kind == "literal_error":
        return f"use one of {ctx.get('expected', 'the allowed values')}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"set type to one of {', '.join(st.type for st in recipe_stages())}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of type {kind.split('_')[0]}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "give a value in range"
    return "see `deploycraft schema` for the field's type and range"


def validation_error(exc: ValidationError, raw: Any, source: str) -> UserError:
    errors = exc.errors(include_url=False)
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, UserError):
            cause.source = source
            return cause
    err = errors[0]
    path = _loc_to_path(tuple(err["loc"]), raw) or "recipe"
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        where = f"{path}.{cause.subfield}" if cause.subfield else path
        return UserError(str(cause), field=where, fix=cause.fix, source=source)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return UserError(msg + more, field=path, fix=_fix_for(err), source=source)


def build_recipe(raw: Any, source: str = "recipe") -> Recipe:
    if raw is None:
        raise UserError("the recipe is empty", source=source, fix="write at least name, model.arch and stages")
    if not isinstance(raw, dict):
        raise UserError(
            f"the recipe must be a mapping of fields, got {type(raw).__name__}",
            source=source,
            fix="start with `name:`, `model:` and `stages:` at the top level",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, raw, source) from None
    except UserError as exc:
        exc.source = exc.source or source
        raise


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"{p} is a directory, not a recipe file",
            fix="give the path of a recipe YAML, e.g. recipes/resnet50_int8.yaml",
        )
    if not p.is_file():
        raise UserError(
            f"recipe file {p} does not exist", fix="give the path of a recipe YAML, e.g. recipes/resnet50_int8.yaml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {p}: {exc}", fix="give a readable UTF-8 YAML file") from None
    raw = parse_yaml(text, str(p))
    if raw is None:
        raise UserError("the recipe is empty", source=str(p), fix="write at least name, model.arch and stages")
    if not isinstance(raw, dict):
        raise UserError(
            f"the recipe must be a mapping of fields, got {type(raw).__name__}",
            source=str(p),
            fix="start with `name:`, `model:` and `stages:` at the top level",
        )
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_recipe(raw, str(p))


def json_schema() -> dict:
    return Recipe.model_json_schema()


def is_schema_file(path: Path) -> bool:
    """Whether ``path`` holds a recipe JSON Schema as `deploycraft schema -o` writes it, of this version or an
    earlier one: an object titled Recipe, with its definitions under $defs and a stages property. `schema -o`
    replaces such a file and nothing else."""
    from deploycraft.outputs import read_json_object

    obj = read_json_object(path)
    return (
        obj is not None
        and obj.get("title") == "Recipe"
        and isinstance(obj.get("$defs"), dict)
        and isinstance(obj.get("properties"), dict)
        and "stages" in obj["properties"]
    )
