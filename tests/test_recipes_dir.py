"""Every recipe shipped in recipes/ validates; its hub model is swapped for the tiny model of the
same family, since hubs are out of reach here."""

from pathlib import Path

import pytest
import yaml

from edgetune.load import detect_family
from edgetune.methods import get_method
from edgetune.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Hub id prefix -> the family its checkpoints belong to (a recipe's processor settings are the family's).
HUB_FAMILIES = {
    "llava-hf/llava-1.5-": "llava",
    "llava-hf/llava-v1.6-": "llava_next",
    "HuggingFaceTB/SmolVLM-": "idefics3",  # SmolVLM v1
    "HuggingFaceTB/SmolVLM2-": "smolvlm",
    "HuggingFaceM4/Idefics3-": "idefics3",
    "Qwen/Qwen2-VL-": "qwen2_vl",
    "Qwen/Qwen2.5-VL-": "qwen2_5_vl",
    "google/paligemma": "paligemma",  # PaliGemma and PaliGemma 2 (google/paligemma2-*) alike
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path, task_dir, tiny_model_dir):
    hub_id = yaml.safe_load(path.read_text())["model"]["path"]
    expected = next(family for prefix, family in HUB_FAMILIES.items() if hub_id.startswith(prefix))
    recipe = load_recipe(path, [f"data.train={task_dir / 'data/train.json'}", f"data.eval={task_dir / 'data/eval.json'}",
                                f"model.path={tiny_model_dir(expected)}"])
    get_method(recipe.method)
    family, _ = detect_family(recipe.model)
    assert family.name == expected
