import json

import pytest
import torch

from edgetune.merge import dequantize_then_merge, load_adapted, probe_batch
from tests.conftest import make_recipe


@pytest.fixture(scope="module")
def run_dir(tiny_llava_dir, task_dir, tmp_path_factory):
    from edgetune.recipe import load_recipe
    from edgetune.train import train

    root = tmp_path_factory.mktemp("merge")
    train(load_recipe(make_recipe(root / "recipe.yaml", tiny_llava_dir, task_dir, train={"max_steps": 10})), root / "run")
    return root / "run"


def test_merged_model_equals_adapter_on_dequantized_base(run_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    report = dequantize_then_merge(run_dir, tmp_path / "merged")
    assert report.max_logit_diff < 1e-4
    backbone, adapted, recipe = load_adapted(run_dir, dequantize=True)
    batch = probe_batch(recipe, backbone)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        expected, got = adapted(**batch).logits, merged(**batch).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            untouched = base(**batch).logits
    assert float((expected - got).abs().max()) < 1e-4
    assert float((untouched - got).abs().max()) > 1e-2  # the adapter really changed the model
    provenance = json.loads((tmp_path / "merged/edgetune.json").read_text())
    assert provenance["merge"]["max_logit_diff"] == report.max_logit_diff
    assert (tmp_path / "merged/tokenizer.json").is_file() and (tmp_path / "merged/preprocessor_config.json").is_file()


def test_merging_into_nf4_would_be_lossier_than_dequantize_then_merge(run_dir):
    """The reason merge dequantizes first: the naive path re-quantizes the adapter's delta."""
    backbone, adapted, recipe = load_adapted(run_dir, dequantize=False)
    batch = probe_batch(recipe, backbone)
    with torch.no_grad():
        expected = adapted(**batch).logits
        naive = adapted.merge_and_unload()(**batch).logits
    assert float((expected - naive).abs().max()) > 1e-3
