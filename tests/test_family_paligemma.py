"""PaliGemma through the whole chain on its tiny model: NF4 placement, answer-only labels with the
prefix-LM mask, LoRA training, dequantize-then-merge, export parity and the torch-free runtime.

The chain tests share the matrix's paligemma-lora pair (conftest.pipeline: 30 steps, merge, export)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgetune.data import collate, load_samples, open_image
from edgetune.errors import UserError
from edgetune.families import FAMILIES
from edgetune.families.base import get_module
from edgetune.load import detect_family, load_backbone
from edgetune.recipe import load_recipe
from tests.conftest import TORCH_BLOCKER, make_recipe

FAMILY = FAMILIES["paligemma"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("paligemma")


@pytest.fixture(scope="module")
def recipe(model_dir, task_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("paligemma-recipe") / "recipe.yaml"
    return load_recipe(make_recipe(path, model_dir, task_dir, train={"max_steps": 30, "lr": 3e-3, "batch_size": 8}))


@pytest.fixture(scope="module")
def processor(model_dir):
    return FAMILY.load_processor(str(model_dir))


@pytest.fixture
def chain(pipeline):
    """(recipe, train result, merge report, manifest, root with run/, merged/, bundle/)."""
    return pipeline("paligemma", "lora")


def test_nf4_quantizes_the_llm_linears_only(recipe):
    model = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32).model
    quantized = [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"]
    assert len(quantized) == 2 * 7 and all(name.startswith(FAMILY.layers + ".") for name in quantized)
    for precise in (FAMILY.vision_tower, FAMILY.connector):
        assert not any(type(m).__name__ == "Linear4bit" for m in get_module(model, precise).modules()), precise
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, kept precise


def test_image_features_equal_transformers_own(model_dir):
    """The traceable image_features (what vision.onnx exports) is get_image_features, / sqrt(hidden) included."""
    model = FAMILY.model_class().from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = FAMILY.image_features(model, pixels), model.model.get_image_features(pixels)
    assert ours.shape == (3, 16, model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_encode_sample_labels_the_answer_only(recipe, processor):
    sample = load_samples(recipe.data.train)[0]
    encoded = FAMILY.encode_sample(processor, sample, recipe.data.max_length)
    tokenizer, labels = processor.tokenizer, encoded["labels"]
    assert tokenizer.decode(labels[labels != -100]) == sample.answer + tokenizer.eos_token
    prompt = tokenizer.decode(encoded["input_ids"][labels == -100])
    assert prompt == "<image>" * processor.image_seq_length + "<bos>" + sample.question + "\n"
    # token_type_ids mark the answer: what the model needs for its prefix-LM mask in training
    assert torch.equal(encoded["token_type_ids"], (labels != -100).long())


def test_a_multi_turn_sample_is_refused(recipe, processor):
    sample = load_samples(recipe.data.train)[0]
    sample.turns = sample.turns * 2
    with pytest.raises(UserError, match=f"sample {sample.id}: PaliGemma answers one question per image"):
        FAMILY.encode_sample(processor, sample, recipe.data.max_length)


def test_training_batches_keep_the_prompt_bidirectional_and_the_answer_causal(recipe, processor, model_dir):
    """Through encode_sample + collate: a prompt token sees later prompt tokens, an answer token
    never sees a later one (without token_type_ids the model would let the answer see itself)."""
    model = FAMILY.model_class().from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = load_samples(recipe.data.train)[:2]
    batch = collate([FAMILY.encode_sample(processor, s, 128) for s in samples], processor.tokenizer.pad_token_id)
    answer = (batch["labels"][0] != -100).nonzero()[:, 0]
    first, last = int(answer[0]), int(answer[-1])
    other = processor.tokenizer.convert_tokens_to_ids("<loc0001>")

    def change(position):
        """Max |logit change| at every position of row 0 when the token at ``position`` changes."""
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, position] = other
        with torch.no_grad():
            return (model(**changed).logits[0] - model(**batch).logits[0]).abs().amax(-1)

    assert change(first - 2)[: first - 2].min() > 1e-4  # every earlier prompt token sees a later one
    assert change(last)[:last].max() == 0  # nothing before the last answer token sees it


@pytest.mark.xdist_group("paligemma-lora")
def test_training_lowers_the_loss(chain):
    _, result, *_ = chain
    assert result.final_loss < 0.75 * result.first_loss


@pytest.mark.xdist_group("paligemma-lora")
def test_dequantize_then_merge_reproduces_the_trained_model(chain):
    _, _, merge, *_ = chain
    assert merge.max_logit_diff < 1e-4


@pytest.mark.xdist_group("paligemma-lora")
def test_export_passes_parity_with_batch_1_and_2(chain):
    *_, manifest, _ = chain
    checks = manifest["parity"]["checks"]
    assert {c["inputs"].split(",")[0] for c in checks} == {"batch 1", "batch 2"}
    assert max(c["max_abs_diff"] for c in checks) < 1e-4
    assert manifest["image"]["codec"] == "paligemma" and manifest["format_version"] == 3
    assert "token_type_ids" in [value["name"] for value in manifest["graphs"]["decoder"]["inputs"]]


@pytest.mark.xdist_group("paligemma-lora")
def test_codec_pixels_equal_the_processors(chain, processor):
    from edgetune.runtime import OnnxVLM

    *_, root = chain
    vlm = OnnxVLM.load(root / "bundle", threads=2)
    rng = np.random.default_rng(0)
    for width, height in [(48, 40), (37, 53), (32, 32)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor.image_processor(image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(vlm.encode_image(image).feeds["pixel_values"], expected, rtol=0, atol=1e-6)


@pytest.mark.xdist_group("paligemma-lora")
def test_runtime_greedy_tokens_equal_generate(chain):
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    recipe, *_, root = chain
    merged, vlm = load_merged(root / "merged"), OnnxVLM.load(root / "bundle", threads=2)
    for sample in load_samples(recipe.data.eval)[:3]:
        inputs = FAMILY.prompt_inputs(merged.processor, [sample.question], [[open_image(sample.images[0])]])
        with torch.no_grad():
            out = merged.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert vlm.generate_ids(sample.images[0], sample.question, max_new_tokens=8) == expected


TORCH_BLOCKED = TORCH_BLOCKER + """
import json
from edgetune.runtime import OnnxVLM
print(json.dumps(OnnxVLM.load(sys.argv[1]).generate_ids(sys.argv[2], sys.argv[3], max_new_tokens=8)))
"""


@pytest.mark.xdist_group("paligemma-lora")
def test_bundle_runs_with_torch_blocked(chain):
    from edgetune.runtime import OnnxVLM

    recipe, *_, root = chain
    sample = load_samples(recipe.data.eval)[0]
    args = [str(root / "bundle"), str(sample.images[0]), sample.question]
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = OnnxVLM.load(root / "bundle", threads=2).generate_ids(sample.images[0], sample.question, max_new_tokens=8)
    assert json.loads(result.stdout) == expected


def test_a_processor_knob_paligemma_lacks_is_an_error(model_dir, task_dir, tmp_path):
    """PaliGemma's image size is fixed by its vision tower's position embeddings: no knobs."""
    recipe = load_recipe(make_recipe(tmp_path / "r.yaml", model_dir, task_dir, model={"processor": {"max_pixels": 1024}}))
    with pytest.raises(UserError, match="model.processor.max_pixels: the 'paligemma' family has no such setting"):
        detect_family(recipe.model)
