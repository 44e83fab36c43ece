"""LLaVA-NeXT through the whole chain on its tiny model: NF4 load, answer-only labels, images of
different sizes in one batch, LoRA training, dequantize-then-merge, export parity, the runtime's
crops and token counts against the HF processor, greedy tokens against generate (also with torch
blocked), and the image_grid_pinpoints recipe knob."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from edgetune.data import Sample, collate, load_samples, open_image, prompt_text
from edgetune.errors import UserError
from edgetune.export.parity import parity_image
from edgetune.families import FAMILIES
from edgetune.load import load_backbone
from edgetune.merge import load_merged
from edgetune.recipe import load_recipe
from edgetune.runtime import OnnxVLM
from tests.conftest import TORCH_BLOCKER, make_recipe

FAMILY = FAMILIES["llava_next"]
CPU = torch.device("cpu")
# (width, height): square, wide, tall, tiny and large; the tiny model's pinpoints give 1x2, 2x1,
# 2x2, 1x3 and 3x1 tile grids.
SIZES = [(48, 48), (48, 40), (37, 53), (100, 40), (20, 90), (7, 5), (300, 200)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llava-next")
    FAMILY.build_tiny(out)
    return out


def recipe_at(path, tiny_dir, task_dir, **sections):
    return load_recipe(make_recipe(path, tiny_dir, task_dir, **sections))


@pytest.fixture(scope="module")
def backbone(tiny_dir, task_dir, tmp_path_factory):
    recipe = recipe_at(tmp_path_factory.mktemp("recipe") / "recipe.yaml", tiny_dir, task_dir)
    return load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)


@pytest.fixture
def chain(pipeline):
    """LoRA, 30 steps on the built-in task, merged and exported: the matrix's llava_next-lora pair."""
    return pipeline("llava_next", "lora")


def noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_nf4_quantizes_the_llm_only(backbone):
    kinds = {name: type(module).__name__ for name, module in backbone.model.named_modules()}
    quantized = [name for name, kind in kinds.items() if kind == "Linear4bit"]
    assert quantized and all(name.startswith(FAMILY.layers + ".") for name in quantized)
    assert len(quantized) == 2 * 7  # every attention and MLP linear of both layers
    for part in (FAMILY.vision_tower, FAMILY.connector):
        linears = [kind for name, kind in kinds.items() if name.startswith(part + ".") and "Linear" in kind]
        assert linears and set(linears) == {"Linear"}, part
    assert backbone.model.model.image_newline.dtype == torch.float32


def test_labels_cover_the_answer_only(backbone, task_dir):
    processor = backbone.processor
    sample = load_samples(task_dir / "data/train.json")[0]
    encoded = FAMILY.encode_sample(processor, sample, 256)
    labelled = encoded["labels"][encoded["labels"] != -100].tolist()
    # The real template closes an answer with "</s> ": the eos and the space after it are the answer's.
    assert labelled == processor.tokenizer(f" {sample.answer}</s> ", add_special_tokens=False).input_ids
    # Everything before is unlabelled and is exactly what generation is prompted with.
    prompt = encoded["input_ids"][: len(encoded["input_ids"]) - len(labelled)].tolist()
    inference = processor(text=[prompt_text(processor, sample)], images=[open_image(sample.images[0])])
    assert prompt == inference["input_ids"][0]


def test_a_batch_of_differently_sized_images_equals_each_alone(backbone, tmp_path):
    """collate zero-pads the crop dim (5 crops for a square image, 4 for a wide one); the model must
    read the padding crops as nothing, so each row's logits equal that sample's alone."""
    samples = []
    for i, size in enumerate([(48, 48), (100, 40), (37, 53)]):
        image = Image.new("RGB", size, (240, 240, 230))
        ImageDraw.Draw(image).ellipse([4, 4, 30, 30], fill=(200, 20, 20))
        image.save(tmp_path / f"{i}.png")
        samples.append(Sample(str(i), [tmp_path / f"{i}.png"], [("user", "What color is the shape?"), ("assistant", "red")]))
    pad_id = backbone.processor.tokenizer.pad_token_id
    items = [FAMILY.encode_sample(backbone.processor, s, 256) for s in samples]
    assert sorted({item["pixel_values"].shape[1] for item in items}) == [4, 5]
    batch = collate(items, pad_id)
    with torch.no_grad():
        together = backbone.model(**batch).logits
        for i, item in enumerate(items):
            alone = backbone.model(**collate([item], pad_id)).logits[0]
            assert float((together[i, : len(alone)] - alone).abs().max()) < 1e-4, i


@pytest.mark.xdist_group("llava_next-lora")
def test_runtime_crops_and_token_counts_equal_the_hf_processor(chain):
    """The codec's crops equal LlavaNextImageProcessor's exactly, and its token counts the ones
    LlavaNextProcessor expands "<image>" to, for square, wide, tall, tiny and large images."""
    *_, root = chain
    processor, vlm = load_merged(root / "merged").processor, OnnxVLM.load(root / "bundle", threads=2)
    counts = set()
    for seed, size in enumerate(SIZES):
        image = noise_image(*size, seed)
        expected = processor.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        encoded = vlm.encode_image(image)
        crops = encoded.feeds["pixel_values"]
        assert np.array_equal(crops, expected[: len(crops)]) and not expected[len(crops) :].any(), size
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
        )
        ids = processor(images=[image], text=[text])["input_ids"][0]
        assert encoded.tokens == ids.count(processor.image_token_id), size
        counts.add(encoded.tokens)
    assert len(counts) >= 5  # the token count follows the image's size


@pytest.mark.xdist_group("llava_next-lora")
def test_training_lowers_the_loss(chain):
    _, result, *_ = chain
    assert result.final_loss < 0.5 * result.first_loss


@pytest.mark.xdist_group("llava_next-lora")
def test_merge_and_export_match_pytorch(chain):
    """Parity covers batch 1 and a left-padded batch 2 whose images differ in size and token count."""
    _, _, merge, manifest, root = chain
    assert merge.max_logit_diff < 1e-4
    checks = manifest["parity"]["checks"]
    assert {c["inputs"].split(",")[0] for c in checks} == {"batch 1", "batch 2"}
    assert max(c["max_abs_diff"] for c in checks) < 1e-4
    vlm = OnnxVLM.load(root / "bundle", threads=2)
    assert vlm.encode_image(parity_image(0)).tokens != vlm.encode_image(parity_image(1)).tokens
    assert (manifest["format_version"], manifest["image"]["codec"]) == (4, "llava_next")  # fused attention
    assert [o["name"] for o in manifest["graphs"]["vision"]["outputs"]] == ["image_embeds", "image_newline"]


@pytest.mark.xdist_group("llava_next-lora")
def test_runtime_greedy_tokens_equal_generate(chain):
    recipe, *_, root = chain
    merged, vlm = load_merged(root / "merged"), OnnxVLM.load(root / "bundle", threads=2)
    tokenizer = merged.processor.tokenizer
    for sample in load_samples(recipe.data.eval)[:3]:
        inputs = merged.processor(text=[prompt_text(merged.processor, sample)], images=[open_image(sample.images[0])],
                                  return_tensors="pt")
        with torch.no_grad():
            out = merged.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert vlm.generate_ids(sample.images[0], sample.question, max_new_tokens=8) == expected


TORCH_BLOCKED = TORCH_BLOCKER + """
import json
from edgetune.runtime import OnnxVLM
print(json.dumps(OnnxVLM.load(sys.argv[1]).generate_ids(sys.argv[2], sys.argv[3], max_new_tokens=8)))
"""


@pytest.mark.xdist_group("llava_next-lora")
def test_bundle_runs_with_torch_blocked(chain, tmp_path):
    """A wide image (1x3 tiles, unpadded columns) on the device side, torch and transformers unimportable."""
    *_, root = chain
    image = tmp_path / "wide.png"
    noise_image(100, 40).save(image)
    args = [str(root / "bundle"), str(image), "What shape is this?"]
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = OnnxVLM.load(root / "bundle", threads=2).generate_ids(image, "What shape is this?", max_new_tokens=8)
    assert json.loads(result.stdout) == expected


def test_image_grid_pinpoints_knob(tiny_dir, task_dir, tmp_path):
    """Fewer pinpoints: the processor tiles and the model unpacks by the same list, so a square image
    costs 2 tiles instead of 4 and the forward still lines up; a knob the family lacks is an error."""
    pinpoints = [[24, 48], [48, 24]]
    recipe = recipe_at(tmp_path / "r.yaml", tiny_dir, task_dir, model={"processor": {"image_grid_pinpoints": pinpoints}})
    small = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)
    assert small.model.config.image_grid_pinpoints == pinpoints
    sample = load_samples(task_dir / "data/train.json")[0]
    item = FAMILY.encode_sample(small.processor, sample, 256)
    assert item["pixel_values"].shape[1] == 3  # base + 2 tiles for a 48x48 image
    with torch.no_grad():
        assert torch.isfinite(small.model(**collate([item], small.processor.tokenizer.pad_token_id)).loss)
    for processor_knobs, message in [
        ({"max_pixels": 1000}, "model.processor.max_pixels"),
        ({"image_grid_pinpoints": [[24, 30]]}, "model.processor.image_grid_pinpoints"),
    ]:
        bad = recipe_at(tmp_path / "bad.yaml", tiny_dir, task_dir, model={"processor": processor_knobs})
        with pytest.raises(UserError, match=message):
            load_backbone(bad.model, bad.quantization, CPU, torch.float32)
