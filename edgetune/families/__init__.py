"""The model-family registry: transformers ``model_type`` -> ModelFamily."""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.errors import UserError
from edgetune.families.base import ModelFamily
from edgetune.families.idefics3 import Idefics3Family, SmolVLMFamily
from edgetune.families.llava import LlavaFamily
from edgetune.families.llava_next import LlavaNextFamily
from edgetune.families.paligemma import PaliGemmaFamily
from edgetune.families.qwen2_vl import Qwen2_5_VLFamily, Qwen2VLFamily

FAMILIES: dict[str, ModelFamily] = {
    "llava": LlavaFamily(),
    "llava_next": LlavaNextFamily(),
    "qwen2_vl": Qwen2VLFamily(),
    "qwen2_5_vl": Qwen2_5_VLFamily(),
    "idefics3": Idefics3Family(),
    "smolvlm": SmolVLMFamily(),
    "paligemma": PaliGemmaFamily(),
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserError(f"model family '{name}' is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of_model_dir(model_dir: Path, where: str = "model.path") -> ModelFamily:
    """The family of a local model directory, read from its config.json."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{where}: {model_dir} has no config.json; point it at a transformers model directory")
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (ValueError, KeyError) as err:
        raise UserError(f"{config_file}: not a transformers config (no model_type): {err}") from None
    if model_type not in FAMILIES:
        raise UserError(
            f"{where}: {model_dir} is a '{model_type}' model, which edgetune does not support; "
            f"supported families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
