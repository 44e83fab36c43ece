"""Qwen2-VL and Qwen2.5-VL through the whole chain on their tiny models, and the torch-free codec
against transformers piece by piece: patches, rotary ids, windows, M-RoPE positions."""

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
from edgetune.export.parity import parity_image
from edgetune.families import FAMILIES
from edgetune.families.base import get_module
from edgetune.load import load_backbone
from edgetune.recipe import load_recipe
from edgetune.runtime.codecs.qwen2_vl import mrope_positions, patches, rotary_position_ids, window_layout
from tests.conftest import TORCH_BLOCKER, make_recipe

FAMILY_NAMES = ["qwen2_vl", "qwen2_5_vl"]
CPU = torch.device("cpu")


# Every test of one family runs on the xdist worker that builds the matrix's <family>-lora pair.
@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.xdist_group(f"{n}-lora")) for n in FAMILY_NAMES])
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model_dir(family, tiny_model_dir):
    return tiny_model_dir(family.name)


@pytest.fixture(scope="module")
def processor(family, model_dir):
    return family.load_processor(str(model_dir))


@pytest.fixture(scope="module")
def frozen_model(family, model_dir):
    return family.model_class().from_pretrained(model_dir, dtype=torch.float32).eval()


def test_nf4_quantizes_the_llm_but_not_the_vision_tower_or_merger(family, model_dir, task_dir, tmp_path):
    import bitsandbytes as bnb

    recipe = load_recipe(make_recipe(tmp_path / "recipe.yaml", model_dir, task_dir))
    model = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32).model
    for part in (family.vision_tower, family.connector):
        linears = [m for m in get_module(model, part).modules() if isinstance(m, torch.nn.Linear)]
        assert linears and not any(isinstance(m, bnb.nn.Linear4bit) for m in linears), part
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(n.startswith(family.layers + ".") for n in quantized)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in the 2B/3B checkpoints


def test_encode_sample_labels_only_the_answer(family, processor, task_dir):
    sample = load_samples(task_dir / "data/train.json")[0]
    encoded = family.encode_sample(processor, sample, 128)
    answer = encoded["labels"][encoded["labels"] != -100]
    assert processor.tokenizer.decode(answer) == f"{sample.answer}<|im_end|>\n"
    image_tokens = int((encoded["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == encoded["image_grid_thw"].prod() // 4 == len(encoded["pixel_values"]) // 4
    other = family.encode_sample(processor, load_samples(task_dir / "data/train.json")[1], 128)
    batch = collate([encoded, other], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == len(encoded["pixel_values"]) + len(other["pixel_values"])
    assert batch["image_grid_thw"].shape == (2, 3)


def test_pixel_knobs_set_the_image_size_and_unknown_knobs_are_refused(family, model_dir, task_dir, tmp_path):
    knobs = {"min_pixels": 16 * 16, "max_pixels": 32 * 32}
    recipe = load_recipe(make_recipe(tmp_path / "r.yaml", model_dir, task_dir, model={"processor": knobs}))
    processor = load_backbone(recipe.model, recipe.quantization, CPU, torch.float32).processor
    grid = processor.image_processor(images=[parity_image(0)], return_tensors="np")["image_grid_thw"][0]
    assert grid.tolist() == [1, 2, 4]  # 48x40: 32x48 pixels (4x6 patches) uncapped, 16x32 under 1024 pixels
    assert processor.image_processor.size == {"shortest_edge": 256, "longest_edge": 1024}  # what a merge saves
    recipe = load_recipe(make_recipe(tmp_path / "bad.yaml", model_dir, task_dir, model={"processor": {"crop_size": 32}}))
    with pytest.raises(UserError, match=r"model\.processor\.crop_size.*max_pixels"):
        load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)


IMAGES = {
    "parity 48x40": lambda: parity_image(0),
    "parity 37x53": lambda: parity_image(1),
    "noise 130x70": lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8)),
    "tall RGBA 20x300 (max_pixels)": lambda: Image.new("RGBA", (20, 300), (10, 200, 30, 128)),
    "grey 9x9 (min_pixels)": lambda: Image.new("L", (9, 9), 90),
}


@pytest.mark.parametrize("name", IMAGES)
def test_codec_patches_equal_the_image_processor(family, frozen_model, processor, model_dir, name):
    image, _ = family.bundle_sections(frozen_model, processor, model_dir)
    expected = processor.image_processor(images=[IMAGES[name]()], return_tensors="np")
    pixels, grid = patches(IMAGES[name](), image["preprocess"])
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    assert float(np.abs(pixels - expected["pixel_values"]).max()) < 1e-6


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 6, 4), (1, 2, 2), (1, 10, 12), (1, 8, 8)])
def test_rotary_ids_and_windows_equal_the_vision_tower(family, frozen_model, grid):
    visual = get_module(frozen_model, family.vision_tower)
    ids = torch.from_numpy(rotary_position_ids(grid, 2))
    freqs = (ids[..., None].float() * visual.rotary_pos_emb.inv_freq).flatten(1)
    assert torch.equal(freqs, visual.rot_pos_emb(torch.tensor([grid])))
    if family.windowed:
        index, cu_seqlens = visual.get_window_index(torch.tensor([grid]))
        order, segments = window_layout(grid, 2, visual.config.patch_size, visual.window_size)
        assert np.array_equal(order, index.numpy())
        boundaries = np.flatnonzero(np.diff(segments)) + 1
        assert [0, *boundaries, len(segments)] == torch.unique_consecutive(torch.tensor(cu_seqlens)).tolist()


def test_mrope_positions_equal_get_rope_index_with_left_padding(frozen_model, processor):
    """Two rows of different lengths (left-padded), the second with two images of other sizes."""
    images = [parity_image(0), parity_image(1), Image.new("RGB", (64, 30))]
    turn = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"Look: {turn} What color?", f"{turn} and {turn} Compare the two pictures, please."]
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    expected, deltas = frozen_model.model.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    config = frozen_model.config
    got, got_deltas = mrope_positions(
        inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), [tuple(g) for g in inputs["image_grid_thw"].tolist()],
        config.image_token_id, config.vision_start_token_id, 2,
    )
    assert inputs["attention_mask"][0, 0] == 0  # the first row is padded
    assert np.array_equal(got, expected.numpy()) and np.array_equal(got_deltas, deltas.numpy())


# ---- the chain: LoRA, merge, export, runtime ------------------------------------------------------


@pytest.fixture
def chain(family, pipeline):
    """LoRA for 30 steps -> dequantize-then-merge -> export: the matrix's <family>-lora pair."""
    return pipeline(family.name, "lora")


def test_lora_lowers_the_loss_and_merges_exactly(chain):
    _, result, merge, _, _ = chain
    assert result.final_loss < 0.75 * result.first_loss
    assert merge.max_logit_diff < 1e-4


def test_export_matches_pytorch_on_images_with_different_token_counts(chain, processor):
    _, _, _, manifest, _ = chain
    checks = manifest["parity"]["checks"]
    assert len(checks) == 8 and max(check["max_abs_diff"] for check in checks) < 1e-4
    grids = processor.image_processor(images=[parity_image(0), parity_image(1)], return_tensors="np")["image_grid_thw"]
    assert grids.tolist() == [[1, 4, 6], [1, 6, 4]]  # 6 tokens each, in transposed grids: positions differ
    assert manifest["format_version"] == 4 and manifest["image"]["codec"] == "qwen2_vl"


def test_runtime_greedy_tokens_equal_generate(chain, family):
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    recipe, _, _, _, root = chain
    merged = load_merged(root / "merged")
    vlm = OnnxVLM.load(root / "bundle")
    for sample in load_samples(recipe.data.eval)[:3]:
        inputs = family.prompt_inputs(merged.processor, [sample.question], [[open_image(sample.images[0])]])
        with torch.no_grad():
            out = merged.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert vlm.generate_ids(sample.images[0], sample.question, max_new_tokens=8) == expected


def test_runtime_gives_the_same_tokens_with_torch_blocked(chain):
    from edgetune.runtime import OnnxVLM

    recipe, _, _, _, root = chain
    script = TORCH_BLOCKER + (
        "import json\nfrom edgetune.runtime import OnnxVLM\n"
        "print(json.dumps(OnnxVLM.load(sys.argv[1]).generate_ids(sys.argv[2], sys.argv[3], max_new_tokens=8)))\n"
    )
    sample = load_samples(recipe.data.eval)[1]
    args = [str(root / "bundle"), str(sample.images[0]), sample.question]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = OnnxVLM.load(root / "bundle").generate_ids(sample.images[0], sample.question, max_new_tokens=8)
    assert json.loads(result.stdout) == expected
