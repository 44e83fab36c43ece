"""The torch-free runtime against transformers on the tiny LLaVA: greedy ids token for token,
image preprocessing, sampling, streaming, eos, broken bundles, and a run with torch blocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from edgetune.errors import UserError
from edgetune.export import export_bundle
from edgetune.families.export_spec import render_prompt
from edgetune.export.parity import parity_image
from edgetune.families import FAMILIES
from edgetune.runtime import OnnxVLM, load_manifest
from edgetune.runtime.generate import stream_text
from edgetune.runtime.preprocess import open_image
from tests.conftest import TORCH_BLOCKER

MAX_NEW = 12
PROMPTS = ["What color is the shape?", "Describe the picture. What shape is this?"]


@pytest.fixture(scope="module")
def bundle_dir(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime") / "bundle"
    export_bundle(tiny_llava_dir, out)
    return out


@pytest.fixture(scope="module")
def vlm(bundle_dir):
    return OnnxVLM.load(bundle_dir, threads=2)


@pytest.fixture(scope="module")
def hf(tiny_llava_dir):
    model = FAMILIES["llava"].model_class().from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_dir, use_fast=False)


def hf_greedy_ids(hf, image, prompt, eos_token_ids, max_new_tokens=MAX_NEW) -> list[int]:
    model, processor = hf
    inputs = processor(images=image, text=render_prompt(processor, prompt), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("case", [0, 1])
def test_greedy_ids_equal_transformers_generate(vlm, hf, case, tmp_path):
    image, prompt = parity_image(case), PROMPTS[case]
    path = tmp_path / "image.png"  # the runtime also takes paths; PNG is lossless
    image.save(path)
    model, processor = hf
    inputs = processor(images=image, text=render_prompt(processor, prompt), return_tensors="pt")
    assert vlm.prompt_ids(prompt, vlm.encode_image(image)) == inputs["input_ids"][0].tolist()

    expected = hf_greedy_ids(hf, image, prompt, vlm.manifest["tokenizer"]["eos_token_ids"])
    assert len(expected) == MAX_NEW  # random weights: no eos, so all 12 steps are compared
    assert vlm.generate_ids(path, prompt, max_new_tokens=MAX_NEW) == expected
    expected_text = processor.decode(expected, skip_special_tokens=True)
    assert vlm.generate(image, prompt, max_new_tokens=MAX_NEW) == expected_text


def test_generation_stops_at_eos_like_transformers(bundle_dir, hf):
    image, prompt = parity_image(0), PROMPTS[0]
    vlm = OnnxVLM.load(bundle_dir)
    first = vlm.generate_ids(image, prompt, max_new_tokens=1)[0]
    third = vlm.generate_ids(image, prompt, max_new_tokens=3)[2]
    vlm.eos_token_ids = {third}  # pretend the model's third token is its eos
    expected = hf_greedy_ids(hf, image, prompt, [third])
    assert vlm.generate_ids(image, prompt, max_new_tokens=MAX_NEW) == expected
    assert len(expected) <= 3 and expected[-1] == third and expected[0] == first


def test_preprocessing_equals_hf_processor(vlm, hf):
    _, processor = hf
    rng = np.random.default_rng(0)
    images = [
        parity_image(0),  # wide, larger than the crop
        parity_image(1),  # tall
        Image.fromarray(rng.integers(0, 256, (13, 20, 3), dtype=np.uint8)),  # smaller: upscaled
        Image.fromarray(rng.integers(0, 256, (70, 33, 4), dtype=np.uint8)),  # RGBA
        Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)),  # grayscale "L"
    ]
    for image in images:
        rgb = open_image(image)  # what training and evaluation hand the processor (RGBA composited on white)
        expected = processor.image_processor(rgb, input_data_format="channels_last", return_tensors="np")["pixel_values"]
        got = vlm.encode_image(image).feeds["pixel_values"]
        assert got.shape == expected.shape == (1, 3, 32, 32)
        assert np.abs(got - expected).max() <= 1e-5


def test_sampling_is_reproducible_with_a_seed(vlm):
    image, prompt = parity_image(1), PROMPTS[1]

    def sample(seed, top_p=0.9):
        return vlm.generate_ids(image, prompt, MAX_NEW, temperature=1.0, top_p=top_p, seed=seed)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    # top_p this small keeps only the most likely token: sampling collapses to greedy
    assert sample(7, top_p=1e-9) == vlm.generate_ids(image, prompt, MAX_NEW)
    with pytest.raises(UserError, match="top_p"):
        sample(7, top_p=0.0)


def test_stream_never_splits_a_character(vlm):
    text = " red héllo 🙂 circle"
    ids = vlm.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # the accents and the emoji span several byte tokens
    pieces = list(stream_text(vlm.tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # on a real answer the streamed pieces join to the decoded ids
    image, prompt = parity_image(0), PROMPTS[0]
    streamed = "".join(vlm.stream(image, prompt, max_new_tokens=MAX_NEW))
    ids = vlm.generate_ids(image, prompt, max_new_tokens=MAX_NEW)
    assert streamed == vlm.tokenizer.decode(ids, skip_special_tokens=True)


def test_missing_or_corrupt_bundle_files_are_named(bundle_dir, tmp_path):
    broken = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (broken / "decoder.onnx").unlink()
    with pytest.raises(UserError, match=r"bundle/decoder\.onnx is missing; re-run `edgetune export`"):
        OnnxVLM.load(broken)
    shutil.copy(bundle_dir / "decoder.onnx", broken / "decoder.onnx")
    (broken / "vision.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"vision\.onnx cannot be loaded by onnxruntime"):
        OnnxVLM.load(broken)
    (broken / "manifest.json").write_text("{ truncated")
    with pytest.raises(UserError, match=r"manifest\.json is not valid JSON"):
        load_manifest(broken)


def test_unreadable_image_is_named(vlm, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"photo\.jpg: cannot read this image"):
        vlm.generate(bad, "What color?", max_new_tokens=2)
    with pytest.raises(UserError, match=r"missing\.png: cannot read this image"):
        vlm.generate(tmp_path / "missing.png", "What color?", max_new_tokens=2)


BLOCK_TORCH = TORCH_BLOCKER + """
import json

from edgetune.runtime import OnnxVLM

vlm = OnnxVLM.load(sys.argv[1])
text = vlm.generate(sys.argv[2], "What color is the shape?", max_new_tokens=6)
ids = vlm.generate_ids(sys.argv[2], "What color is the shape?", max_new_tokens=6)
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"text": text, "ids": ids, "modules": blocked}))
"""


def test_runtime_runs_with_torch_and_transformers_blocked(bundle_dir, vlm, tmp_path):
    image = tmp_path / "image.png"
    parity_image(0).save(image)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, str(bundle_dir), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert out["ids"] == vlm.generate_ids(image, "What color is the shape?", max_new_tokens=6)
    assert out["text"] == vlm.tokenizer.decode(out["ids"], skip_special_tokens=True) and out["text"]


def test_bundles_from_a_newer_edgetune_are_refused_by_name(bundle_dir, tmp_path):
    broken = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 5}))
    with pytest.raises(UserError, match=r"format_version 5 is not one this runtime reads \(1, 2, 3, 4\)"):
        OnnxVLM.load(broken)
    manifest["image"]["codec"] = "hologram"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"image codec 'hologram' is unknown to this runtime; update edgetune"):
        OnnxVLM.load(broken)
