"""Shared fixtures: tiny random-weight models written to disk and loaded back with from_pretrained,
exactly as a user's local model directory would be."""

from __future__ import annotations

import os

import pytest
import torch

from edgetune.families import FAMILIES
from edgetune.methods import METHODS

# The methods of the family x method matrix: every registered one, plus LLaMA-Adapter's
# multimodal variant.
VARIANTS = {name: {"name": name} for name in sorted(METHODS)}
VARIANTS["llama_adapter-visual"] = {"name": "llama_adapter", "visual_prompt": True}

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker; tiny models gain nothing from more

# Python source to put first in a `python -c` script: from then on importing torch or transformers
# fails, as on a device that only has the runtime installed.
TORCH_BLOCKER = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, BlockTorch())
try:
    import torch
    raise SystemExit("the blocker did not block torch")
except ImportError:
    pass
"""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family name -> a tiny model directory of that family, built once per session."""
    built = {}

    def build(family):
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            FAMILIES[family].build_tiny(built[family])
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_model_dir):
    return tiny_model_dir("llava")


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A small copy of the quickstart's built-in task: data/train.json, data/eval.json, images/."""
    from edgetune.builtin_task import write_task

    out = tmp_path_factory.mktemp("task")
    write_task(out / "data", train_count=48, eval_count=16)
    return out


def make_recipe(path, model_dir, task, **sections):
    """Write a recipe YAML for the tiny LLaVA + built-in task to ``path``, with per-test changes."""
    import yaml

    recipe = {
        "model": {"path": str(model_dir)},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(task / "data/train.json"), "eval": str(task / "data/eval.json"), "max_length": 128},
        "train": {"max_steps": 8, "lr": 3e-3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0},
    }
    if sections.get("method", {}).get("name", "lora") != "lora":
        recipe["method"] = {}  # the LoRA options above would be an error for another method
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def write_recipe(tiny_llava_dir, task_dir, tmp_path):
    """make_recipe into this test's tmp_path; returns the recipe's path."""
    return lambda **sections: make_recipe(tmp_path / "recipe.yaml", tiny_llava_dir, task_dir, **sections)


@pytest.fixture(scope="session")
def pipeline(tiny_model_dir, task_dir, tmp_path_factory):
    """(family, variant) -> (recipe, train result, merge report, manifest, root): 30 training steps,
    dequantize-then-merge and export, each pair built once per session (per xdist worker; the
    tests of one pair share an xdist group). root holds run/, merged/ and bundle/."""
    from edgetune.export import export_bundle
    from edgetune.merge import dequantize_then_merge
    from edgetune.recipe import load_recipe
    from edgetune.train import train

    built = {}

    def build(family, variant):
        if (family, variant) not in built:
            root = tmp_path_factory.mktemp(f"{family}-{variant}")
            recipe = load_recipe(make_recipe(root / "recipe.yaml", tiny_model_dir(family), task_dir, method=VARIANTS[variant],
                                             train={"max_steps": 30, "lr": 3e-3, "batch_size": 8}))
            result = train(recipe, root / "run")
            merge = dequantize_then_merge(root / "run", root / "merged")
            manifest = export_bundle(root / "merged", root / "bundle", eval_samples=0)  # accuracy: tests/test_precision.py
            built[family, variant] = recipe, result, merge, manifest, root
        return built[family, variant]

    return build


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items):
    """Group tests for pytest-xdist's --dist loadgroup so that an expensive fixture is built once:
    every test of one family x method pair on one worker (with the family test files' chain tests,
    which use that family's lora pair), and a module with a module-scoped fixture as one group.
    Marks given through fixture params do not reach xdist, so the pair groups are set here."""
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if "trained_and_exported" in params:
            group = "-".join(params["trained_and_exported"])
        elif "family" in params and ("chain" in item.fixturenames or "pipeline" in item.fixturenames):
            group = f"{getattr(params['family'], 'name', params['family'])}-lora"
        elif "variant" in params and "pipeline" in item.fixturenames:  # tests/test_precision.py, on LLaVA
            group = f"llava-{params['variant']}"
        elif any(m.name == "xdist_group" for m in item.iter_markers()):
            continue
        elif any(getattr(fixture[-1], "scope", "") == "module" for fixture in item._fixtureinfo.name2fixturedefs.values()):
            group = item.module.__name__
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
