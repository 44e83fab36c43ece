"""Export the tiny LLaVA once and check the bundle: its files and manifest, ONNX-vs-PyTorch parity
over batch sizes, prompt lengths and cache lengths, and that refused or failed exports leave
nothing on disk."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor

from edgetune.errors import UserError
from edgetune.export import ParityError, bundle as export_module, export_bundle
from edgetune.export.parity import compare_with_pytorch, parity_image
from edgetune.families import FAMILIES
from edgetune.runtime import OnnxVLM

FP32_EXPECTED = 1e-4  # what fp32 achieves on the tiny model (measured ~3e-7); the gate is 1e-3


@pytest.fixture(scope="module")
def bundle(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    return out, export_bundle(tiny_llava_dir, out)


@pytest.fixture(scope="module")
def reference(tiny_llava_dir):
    family = FAMILIES["llava"]
    model = family.model_class().from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    return family, model, AutoProcessor.from_pretrained(tiny_llava_dir, use_fast=False)


def test_bundle_has_files_and_manifest(bundle, tiny_llava_dir):
    out, manifest = bundle
    for name in [
        "vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "preprocessor_config.json", "manifest.json",
    ]:  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format_version"], manifest["family"], manifest["precision"]) == (4, "llava", "fp32")  # fused
    text = {"hidden_size": 64, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 432, "tied_embeddings": False,
            "padded_rows": "one_at_a_time"}
    assert manifest["text"] == text

    graphs = manifest["graphs"]
    shapes = {g: {v["name"]: v["shape"] for v in graphs[g]["inputs"] + graphs[g]["outputs"]} for g in graphs}
    assert shapes["vision"] == {"pixel_values": ["batch", 3, 32, 32], "image_embeds": ["batch", 16, 64]}
    assert shapes["embed"] == {"input_ids": ["batch", "seq"], "inputs_embeds": ["batch", "seq", 64]}
    decoder = shapes["decoder"]
    assert decoder["logits"] == ["batch", "seq", 432]
    assert decoder["attention_mask"] == ["batch", "total"]
    for i in range(2):
        for kind in ("key", "value"):
            assert decoder[f"past_key_values.{i}.{kind}"] == ["batch", 2, "past", 16]
            assert decoder[f"present.{i}.{kind}"] == ["batch", 2, "past + seq", 16]
    for graph in graphs.values():
        assert all((out / f).is_file() for f in graph["data_files"])

    preprocessor = json.loads((tiny_llava_dir / "preprocessor_config.json").read_text())
    image = manifest["image"]
    assert (image["token_id"], image["tokens_per_image"], image["size"]) == (4, 16, [32, 32])
    assert image["preprocess"]["mean"] == preprocessor["image_mean"]
    assert image["preprocess"]["std"] == preprocessor["image_std"]
    assert image["preprocess"]["rescale_factor"] == preprocessor["rescale_factor"]
    assert (image["preprocess"]["resize_shortest_edge"], image["preprocess"]["resample"]) == (32, "bicubic")

    tokenizer = manifest["tokenizer"]
    assert (tokenizer["bos_token_id"], tokenizer["eos_token_ids"], tokenizer["pad_token_id"]) == (1, [2], 3)
    assert tokenizer["adds_bos"] is True
    prompt = manifest["prompt"]
    assert prompt["single_turn"] == "USER: <image>\n{prompt} ASSISTANT:"
    assert prompt["single_turn"][prompt["image_placeholder_offset"] :].startswith("<image>")
    assert "{% for message in messages %}" in prompt["chat_template"]
    assert manifest["source"] == {"model": str(tiny_llava_dir)}

    parity = manifest["parity"]
    assert parity["tolerance"] == 1e-3
    assert {c["graph"] for c in parity["checks"]} == {"vision.onnx", "embed.onnx", "decoder.onnx"}
    inputs = {c["inputs"] for c in parity["checks"] if c["graph"] == "decoder.onnx"}
    steps = ("prefill, past 0", "decode 1 token, past = prompt")
    assert inputs == {f"batch {b}, {step}" for b in (1, 2) for step in steps}
    assert max(c["max_abs_diff"] for c in parity["checks"]) <= FP32_EXPECTED


SHORT, MEDIUM = "Red?", "What color is the shape?"
LONG = "Describe the picture. What shape is this? Answer with one word."


@pytest.mark.parametrize(
    "prompts",
    [[SHORT], [LONG], [MEDIUM, SHORT], [SHORT, MEDIUM, LONG]],
    ids=["batch1-short", "batch1-long", "batch2-padded", "batch3-three-lengths"],
)
def test_onnx_logits_match_pytorch(bundle, reference, prompts):
    family, model, processor = reference
    vlm = OnnxVLM.load(bundle[0])
    images = [parity_image(i) for i in range(len(prompts))]
    diffs = compare_with_pytorch(family, model, processor, vlm, images, prompts)
    assert set(diffs) == {"vision", "embed", "prefill", "decode"}  # decode: past > 0, prefill: past 0
    assert max(diffs.values()) <= FP32_EXPECTED, diffs


def test_export_refuses_a_non_empty_dir(tiny_llava_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_bundle(tiny_llava_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_no_directory(tiny_llava_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", 0.0)  # no export can match PyTorch exactly
    with pytest.raises(ParityError, match=r"\.onnx differs from PyTorch by .*; tolerance is 0"):
        export_bundle(tiny_llava_dir, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its scratch directory
