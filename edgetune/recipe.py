"""The YAML recipe, read once at the edge into typed, validated config.

Sections: model, quantization, method, data, train, export. Relative paths resolve against the
recipe file's directory. Any problem (unknown key, wrong type, missing file) becomes a UserError
naming the file and the key path, so the core only ever sees a valid ``Recipe``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgetune.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str  # hub id or local directory
    trust_remote_code: bool = False
    # Image-processor settings the family offers (its processor_knobs), e.g. Qwen2-VL's max_pixels;
    # checked against the family once the model's config is read.
    processor: dict[str, Any] = {}


class QuantizationSection(Section):
    mode: Literal["nf4", "int8", "none"] = "nf4"
    double_quant: bool = True  # NF4's quantized quantization constants: ~0.4 bit/param saved


class MethodSection(Section):
    """Options common to every method plus each method's own; the method's registry entry
    rejects any option set in a recipe that it does not use (see edgetune.methods)."""

    name: str = "lora"
    train_connector: bool = True
    rank: int = Field(8, gt=0)  # lora, adalink
    alpha: float = Field(16.0, gt=0)  # lora
    dropout: float = Field(0.05, ge=0, lt=1)  # lora
    placement: Literal["attn", "mlp", "both"] = "both"  # lora, ia3, adapter
    layers: list[int] | None = None  # LLM layer indices to adapt; None = the method's default
    prompt_len: int = Field(10, gt=0)  # llama_adapter (K adaption prompts), prefix (prefix length)
    visual_prompt: bool = False  # llama_adapter: add a projected global image feature to every prompt
    bottleneck: int = Field(16, gt=0)  # adapter
    mode: Literal["sequential", "parallel"] = "sequential"  # adapter


class DataSection(Section):
    train: Path
    eval: Path | None = None
    max_length: int = Field(1024, gt=0)


class TrainSection(Section):
    max_steps: int = Field(200, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    eval_every: int = Field(50, ge=0)  # 0 = only at the end
    eval_samples: int = Field(64, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    # DataLoader worker processes that decode images while the step runs; "auto": 2 on CUDA, 0 on CPU
    # (there the step itself uses every core). Same seed -> the same batches, whatever the count.
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # Run the frozen vision tower once per image and read its outputs from a cache on disk instead
    # (edgetune.image_cache); needs a frozen tower and images that are not augmented.
    cache_image_features: bool = False
    # Checkpoints inside the run directory (edgetune.checkpoint), for `edgetune train --resume`: every
    # N optimizer steps, or "auto": whenever 10 minutes have passed since the last one; 0 = none
    # (a run then still saves one at Ctrl-C and at a non-finite loss). The newest keep_checkpoints stay.
    save_every: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    keep_checkpoints: int = Field(2, gt=0)
    # Steps whose loss or gradient norm is not finite that may be skipped (no update) and reported
    # before the run stops at one; 0 = stop at the first.
    skip_nonfinite: int = Field(0, ge=0)


class ExportSection(Section):
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    method: MethodSection = MethodSection()
    data: DataSection
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()

    def to_yaml_dict(self) -> dict[str, Any]:
        """Every value, defaults included, but only the method options that apply to the method."""
        from edgetune.methods import COMMON_OPTIONS, METHODS  # the registry imports this module

        data = self.model_dump(mode="json")
        if self.method.name in METHODS:
            keep = COMMON_OPTIONS | METHODS[self.method.name].options
            data["method"] = {k: v for k, v in data["method"].items() if k in keep}
        return data


# Keys a resumed run may change: they steer the loop's length, its reporting and how it runs, not
# what a step computes up to the checkpoint (train.lr and train.precision are the non-finite guard's
# fixes). Any other change is refused, since the checkpoint's state would not match the recipe.
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.lr", "train.precision", "train.device", "train.eval_every", "train.eval_samples",
    "train.max_new_tokens", "train.num_workers", "train.save_every", "train.keep_checkpoints",
    "train.skip_nonfinite", "train.gradient_checkpointing", "train.cache_image_features", "data.eval", "export.precision",
})


def changed_keys(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs between two recipes."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    before, after = flat(old.to_yaml_dict()), flat(new.to_yaml_dict())
    return [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set train.max_steps=50")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        section = _section_of(first["loc"])
        known = ", ".join(section.model_fields) if section else ""
        return f"{source}: unknown key '{key}'" + (f" (known keys here: {known})" if known else "")
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    return f"{source}: {key}: {first['msg']} (got {first.get('input')!r})"


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def recipe_from_dict(raw: Any, source: str, base_dir: Path) -> Recipe:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with sections model, data, method, train, ...")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(source, err)) from None
    return _resolve_paths(recipe, source, base_dir)


def _resolve_paths(recipe: Recipe, source: str, base_dir: Path) -> Recipe:
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if value is None:
            continue
        path = value if value.is_absolute() else (base_dir / value).resolve()
        if not path.is_file():
            raise UserError(f"{source}: data.{key}: file {path} does not exist; fix the path (relative paths start at the recipe's folder)")
        setattr(recipe.data, key, path)
    local = Path(recipe.model.path)
    local = local if local.is_absolute() else base_dir / local
    if local.exists():
        recipe.model.path = str(local.resolve())
    elif recipe.model.path.startswith((".", "/", "~")) or recipe.model.path.count("/") != 1:
        raise UserError(f"{source}: model.path: {local} does not exist and is not a hub id (owner/name); fix the path")
    return recipe


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    raw = apply_overrides(raw or {}, overrides or [])
    return recipe_from_dict(raw, str(path), path.parent.resolve())


def save_recipe(recipe: Recipe, path: Path) -> None:
    from edgetune.io import write_atomically

    write_atomically(path, yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False))
