"""Every recipe shipped in recipes/ validates; its hub model is swapped for the tiny model of the
same class, since hubs are out of reach here."""

from pathlib import Path

import pytest

from edgetune.load import detect_family
from edgetune.methods import get_method
from edgetune.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path, task_dir, tiny_llava_dir):
    recipe = load_recipe(path, [f"data.train={task_dir / 'data/train.json'}", f"data.eval={task_dir / 'data/eval.json'}",
                                f"model.path={tiny_llava_dir}"])
    get_method(recipe.method)
    family, _ = detect_family(recipe.model)
    assert family.name in path.stem
