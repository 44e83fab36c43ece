"""Every recipe shipped in recipes/ validates; its hub model is swapped for the tiny model of the
same family, since hubs are out of reach here."""

from pathlib import Path

import pytest
import yaml

from edgetune.families import FAMILIES
from edgetune.load import detect_family
from edgetune.methods import get_method
from edgetune.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Hub id prefix -> the family its checkpoints belong to (a recipe's processor settings are the family's).
HUB_FAMILIES = {
    "llava-hf/llava-1.5-": "llava",
    "llava-hf/llava-v1.6-": "llava_next",
    "HuggingFaceTB/SmolVLM-": "idefics3",  # SmolVLM v1; SmolVLM2-* is model_type smolvlm
    "HuggingFaceM4/Idefics3-": "idefics3",
}


@pytest.fixture(scope="session")
def tiny_dir_of(tiny_llava_dir, tmp_path_factory):
    built = {"llava": tiny_llava_dir}

    def tiny_dir(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            FAMILIES[family].build_tiny(built[family])
        return built[family]

    return tiny_dir


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path, task_dir, tiny_dir_of):
    hub_id = yaml.safe_load(path.read_text())["model"]["path"]
    expected = next(family for prefix, family in HUB_FAMILIES.items() if hub_id.startswith(prefix))
    recipe = load_recipe(path, [f"data.train={task_dir / 'data/train.json'}", f"data.eval={task_dir / 'data/eval.json'}",
                                f"model.path={tiny_dir_of(expected)}"])
    get_method(recipe.method)
    family, _ = detect_family(recipe.model)
    assert family.name == expected
