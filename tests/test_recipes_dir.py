"""Every recipe shipped in recipes/ validates; its hub model is swapped for the tiny model of the
same family, since hubs are out of reach here."""

from pathlib import Path

import pytest

from edgetune.families import FAMILIES
from edgetune.load import detect_family
from edgetune.methods import get_method
from edgetune.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def family_of(path: Path) -> str:
    """The family a recipe is for, from its file name: "qwen2.5-vl-3b-8gb" -> "qwen2_5_vl"."""
    stem = path.stem.replace(".", "-")
    return max((name for name in FAMILIES if stem.startswith(name.replace("_", "-"))), key=len)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path, task_dir, tiny_model_dir):
    expected = family_of(path)
    recipe = load_recipe(path, [f"data.train={task_dir / 'data/train.json'}", f"data.eval={task_dir / 'data/eval.json'}",
                                f"model.path={tiny_model_dir(expected)}"])
    get_method(recipe.method)
    family, _ = detect_family(recipe.model)
    assert family.name == expected
