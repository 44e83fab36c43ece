"""Idefics3 / SmolVLM v1 on the tiny model: NF4 placement, assistant-only labels, the tiled vision
path against transformers' own, the codec against the HF processor, and the whole chain (train,
merge, export, torch-free runtime) on images that become different numbers of tiles. SmolVLM2
(family smolvlm: other classes, same code) shares the vision path and codec checks here; the
family x method matrix runs its chain."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgetune.data import load_samples, open_image
from edgetune.errors import UserError
from edgetune.families import FAMILIES
from edgetune.load import load_backbone
from edgetune.recipe import load_recipe
from edgetune.runtime.codecs.idefics3 import Idefics3Codec, tiles
from tests.conftest import TORCH_BLOCKER, make_recipe

FAMILY = FAMILIES["idefics3"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("idefics3")


@pytest.fixture(scope="module")
def backbone(tiny, task_dir, tmp_path_factory):
    recipe = load_recipe(make_recipe(tmp_path_factory.mktemp("recipe") / "r.yaml", tiny, task_dir))
    return load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)


def codec_params(image_processor) -> dict:
    """The manifest's preprocess section for ``image_processor`` (as bundle_sections writes it)."""
    return {
        "longest_edge": image_processor.size["longest_edge"] if image_processor.do_resize else None,
        "tile_size": image_processor.max_image_size["longest_edge"],
        "split": image_processor.do_image_splitting,
        "resample": Image.Resampling(image_processor.resample).name.lower(),
        "rescale_factor": image_processor.rescale_factor,
        "mean": image_processor.image_mean,
        "std": image_processor.image_std,
    }


def test_nf4_quantizes_the_llm_and_keeps_vision_and_connector_precise(backbone):
    import bitsandbytes as bnb

    model = backbone.model
    for part in (model.model.vision_model, model.model.connector):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
    assert isinstance(model.model.connector.modality_projection.proj, torch.nn.Linear)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.model.text_model.modules()) == 2 * 7


def test_encode_sample_labels_only_the_answer(backbone, task_dir):
    sample = load_samples(task_dir / "data/train.json")[0]
    encoded = FAMILY.encode_sample(backbone.processor, sample, 128)
    tokenizer = backbone.processor.tokenizer
    labelled = encoded["labels"] != -100
    assert tokenizer.decode(encoded["input_ids"][labelled]) == f" {sample.answer}<end_of_utterance>\n"
    assert not labelled[: -len(tokenizer(f" {sample.answer}<end_of_utterance>\n").input_ids)].any()
    # a 48 px image: 64 px after the longest-edge resize, 2 x 2 tiles of 32 px + the global image
    assert tuple(encoded["pixel_values"].shape) == (1, 5, 3, 32, 32)
    assert int((encoded["input_ids"] == backbone.processor.image_token_id).sum()) == 5 * 4


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_features_equal_transformers_own(tiny_model_dir, family, dtype):
    """The traceable image_features (position ids shared by all tiles) is get_image_features, in
    bf16 too, where transformers 4.57 gives the tiles other position ids than in fp32."""
    family = FAMILIES[family]
    model = family.model_class().from_pretrained(tiny_model_dir(family.name), dtype=dtype).eval()
    pixels = torch.randn(5, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        ours = family.image_features(model, pixels)
        theirs = model.get_image_features(pixels[None])
    assert ours.shape == (5, 4, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the tiny model's own: longest edge 64, tiles of 32
        {"do_image_splitting": False},
        {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}},  # SmolVLM-256M's
    ],
    ids=["tiny", "no-split", "smolvlm-256m"],
)
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_codec_tiles_and_text_equal_the_hf_processor(tiny_model_dir, family, settings):
    """The codec "idefics3" serves both families: SmolVLMImageProcessor and SmolVLMProcessor
    (without its video processor) are separate copies of Idefics3's."""
    processor = FAMILIES[family].load_processor(str(tiny_model_dir(family)))
    for key, value in settings.items():
        setattr(processor.image_processor, key, value)
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (100, 40), (7, 90), (33, 31)] if settings.get("size") is None else [(300, 1000)]
    text = "<|im_start|>User:<image>Hi?<end_of_utterance>\nAssistant:"
    codec = Idefics3Codec({"image": {"token": "<image>", "tokens_per_tile": processor.image_seq_len,
                                     "tile_token": "<fake_token_around_image>", "global_token": "<global-img>",
                                     "preprocess": codec_params(processor.image_processor)}})
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(text=[text], images=[[image]], return_tensors="np")
        frames, rows, cols = tiles(image, codec.image["preprocess"])
        np.testing.assert_allclose(frames, expected["pixel_values"][0], rtol=0, atol=1e-6)
        encoded = codec.encode(image)
        ids = processor.tokenizer(text.replace("<image>", codec.image_text(encoded)))["input_ids"]
        assert ids == expected["input_ids"][0].tolist(), (width, height)
        assert encoded.tokens == int((expected["input_ids"][0] == processor.image_token_id).sum())


def test_processor_knobs_change_tiles_and_unknown_ones_are_named(tiny, task_dir, tmp_path):
    def loaded(knobs):
        recipe = load_recipe(make_recipe(tmp_path / "r.yaml", tiny, task_dir, model={"processor": knobs}))
        return load_backbone(recipe.model, recipe.quantization, CPU, torch.float32)

    sample = load_samples(task_dir / "data/train.json")[0]
    chosen = loaded({"longest_edge": 32, "tile_size": 16})  # 48 px -> 32 px -> 2 x 2 tiles of 16 px
    encoded = FAMILY.encode_sample(chosen.processor, sample, 128)
    assert tuple(encoded["pixel_values"].shape) == (1, 5, 3, 16, 16)
    assert int((encoded["input_ids"] == chosen.processor.image_token_id).sum()) == 5 * 1
    single = FAMILY.encode_sample(loaded({"do_image_splitting": False}).processor, sample, 128)
    assert tuple(single["pixel_values"].shape) == (1, 1, 3, 32, 32)
    with pytest.raises(UserError, match=r"model\.processor\.max_pixels"):
        loaded({"max_pixels": 1000})
    with pytest.raises(UserError, match=r"model\.processor\.tile_size: 20 is not a multiple of 16"):
        loaded({"tile_size": 20})


@pytest.fixture
def chain(pipeline):
    """LoRA for 30 steps -> dequantize-then-merge -> export: the matrix's idefics3-lora pair."""
    return pipeline("idefics3", "lora")


@pytest.mark.xdist_group("idefics3-lora")
def test_training_lowers_the_loss_and_merge_export_match_pytorch(chain):
    _, result, merge, manifest, _ = chain
    assert result.final_loss < 0.75 * result.first_loss
    assert merge.max_logit_diff < 1e-4
    assert manifest["image"]["codec"] == "idefics3" and manifest["format_version"] == 4  # fused attention
    assert max(check["max_abs_diff"] for check in manifest["parity"]["checks"]) < 1e-4


@pytest.mark.xdist_group("idefics3-lora")
def test_parity_with_images_of_different_tile_counts(chain):
    """The export's parity images both become 2 x 2 tiles here; a batch of 5 and 3 tiles (the
    processor pads the second with zero frames) must match as well."""
    from edgetune.export.parity import compare_with_pytorch
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    *_, root = chain
    merged, vlm = load_merged(root / "merged"), OnnxVLM.load(root / "bundle")
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (100, 40), (30, 30, 200))]
    assert [vlm.encode_image(image).tokens for image in images] == [5 * 4, 3 * 4]
    prompts = ["What color?", "Which shape is it?"]
    diffs = compare_with_pytorch(merged.family, merged.model, merged.processor, vlm, images, prompts)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.xdist_group("idefics3-lora")
def test_parity_runs_fewer_tiles_and_checks_the_own_settings_without_the_model(chain, tmp_path):
    """A model whose processor makes a 4 x 4 grid (SmolVLM's 2048 px over 512 px tiles; here 128 over 32):
    the export's parity runs its images at two tiles a side (5 frames instead of 17), checks the runtime's
    tokens and pixels at the model's own settings against the HF processor, and the bundle still answers
    as PyTorch does at those settings."""
    import shutil

    from edgetune.export import export_bundle
    from edgetune.export.parity import compare_with_pytorch, parity_image
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    *_, root = chain
    model_dir = shutil.copytree(root / "merged", tmp_path / "merged")
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    config["size"] = {"longest_edge": 128}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(config))
    manifest = export_bundle(model_dir, tmp_path / "bundle", eval_samples=0)
    assert manifest["image"]["preprocess"]["longest_edge"] == 128 and manifest["parity"]["processor"] == {"longest_edge": 64}
    own = [check for check in manifest["parity"]["checks"] if check["graph"] == "preprocessing"]
    assert len(own) == 2 and max(check["max_abs_diff"] for check in own) < 1e-4
    vlm, merged = OnnxVLM.load(tmp_path / "bundle"), load_merged(model_dir)
    images = [parity_image(0), parity_image(1)]
    assert [vlm.encode_image(image).tokens for image in images] == [(4 * 4 + 1) * 4, (4 * 3 + 1) * 4]
    diffs = compare_with_pytorch(merged.family, merged.model, merged.processor, vlm, images, ["What color?", "Which shape?"])
    assert max(diffs.values()) < 1e-4, diffs


TORCH_BLOCKED = TORCH_BLOCKER + """
import json
from edgetune.runtime import OnnxVLM
vlm = OnnxVLM.load(sys.argv[1])
print(json.dumps([vlm.generate_ids(image, question, max_new_tokens=8) for image, question in json.loads(sys.argv[2])]))
"""


@pytest.mark.xdist_group("idefics3-lora")
def test_runtime_greedy_tokens_equal_generate_with_and_without_torch(chain):
    from edgetune.merge import load_merged
    from edgetune.runtime import OnnxVLM

    recipe, *_, root = chain
    merged, vlm = load_merged(root / "merged"), OnnxVLM.load(root / "bundle")
    samples = load_samples(recipe.data.eval)[:3]
    expected = []
    for sample in samples:
        inputs = merged.family.prompt_inputs(merged.processor, [sample.question], [[open_image(sample.images[0])]])
        with torch.no_grad():
            out = merged.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert [vlm.generate_ids(s.images[0], s.question, max_new_tokens=8) for s in samples] == expected
    asked = json.dumps([[str(s.images[0]), s.question] for s in samples])
    blocked = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, str(root / "bundle"), asked],
                             capture_output=True, text=True, check=True)
    assert json.loads(blocked.stdout.strip().splitlines()[-1]) == expected
