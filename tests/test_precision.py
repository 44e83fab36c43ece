"""Bundle precisions on every family's tiny model: fp16, int8 and int4 export, pass their tolerances,
hold the ops their precision promises (MatMulNBits counted), shrink by the expected factor, store a
tied table once, and answer with torch and transformers blocked. Every method reaches an int4
bundle; prefix tuning's KV prefix follows an fp16 cache. Bad options are refused before any work."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import onnx
import pytest
from safetensors.numpy import load_file

from edgetune.errors import UserError
from edgetune.export import ParityError, bundle as export_module, export_bundle
from edgetune.export.bundle import export_bundles
from edgetune.export.precision import eight_bit_block, precision_options
from edgetune.export.parity import parity_image
from edgetune.families import FAMILIES
from edgetune.runtime import OnnxVLM
from tests.conftest import TORCH_BLOCKER
from tests.test_cli import assert_user_error, run

PRECISIONS = ("fp16", "int8", "int4")
EVAL_SAMPLES = 2  # the fidelity chain's held-out questions; the benchmark answers all of them


def op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def weight_matmuls(path) -> int:
    """MatMuls (or Gemms, torch.onnx's linear on 2-D input) whose weight is a constant 2-D tensor with
    more than one input feature: the linear layers (and the LM head), not the fused rotary's [1, N]
    frequencies."""
    model = onnx.load(str(path), load_external_data=False)
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    return sum(node.op_type in ("MatMul", "Gemm") and len(dims.get(node.input[1], [])) == 2 and dims[node.input[1]][0] > 1
               for node in model.graph.node)


BLOCKED_ANSWERS = TORCH_BLOCKER + """
import json

from edgetune.runtime import OnnxVLM

answers = {}
for bundle in sys.argv[2:]:
    answers[bundle] = OnnxVLM.load(bundle).generate_ids(sys.argv[1], "What color is the shape?", max_new_tokens=5)
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"answers": answers, "modules": blocked}))
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_precision_exports_within_tolerance(family, pipeline, tmp_path):
    """fp16/int8/int4 bundles of the family's trained LoRA pair: tolerances met, fidelity chain from the
    run as trained to the precision, the ops and sizes the precision promises, torch-free answers."""
    recipe, _, _, fp32_manifest, root = pipeline(family, "lora")
    fp32 = root / "bundle"
    bundles = {precision: tmp_path / precision for precision in PRECISIONS}
    manifests = export_bundles(root / "merged", {out: precision_options(p) for p, out in bundles.items()},
                               eval_samples=EVAL_SAMPLES, run_dir=root / "run")
    for (precision, out), manifest in zip(bundles.items(), manifests):
        assert json.loads((out / "manifest.json").read_text()) == manifest
        assert (manifest["precision"], manifest["vision_precision"]) == (precision, {"fp16": "fp16"}.get(precision, "int8"))
        limits, measured = manifest["tolerances"]["limits"], manifest["tolerances"]["measured"]
        assert all(measured[key] <= limit for key, limit in limits.items()), (precision, measured)
        stages = [row["stage"] for row in manifest["fidelity"]]
        assert stages[:3] == ["nf4 + lora (pytorch)", "merged fp32 (pytorch)", "onnx fp32"] and stages[3].startswith(f"onnx {precision}")
        for row in manifest["fidelity"]:
            assert row["accuracy"] is not None and 0 <= row["agreement"] <= 1 and row["bundle_mb"] > 0, row
        dtypes = {v["name"]: v["dtype"] for v in manifest["graphs"]["decoder"]["inputs"] + manifest["graphs"]["decoder"]["outputs"]}
        cache = "float16" if precision == "fp16" else "float32"
        assert dtypes["past_key_values.0.key"] == dtypes["present.0.value"] == cache
        assert dtypes["inputs_embeds"] == dtypes["logits"] == "float32"
    # int4: every linear layer of the decoder (and the LM head) is a MatMulNBits, 4 bits a weight; a
    # fused decoder's query, key and value projections are one (edgetune.export.fusions.pack_qkv).
    linears = weight_matmuls(fp32 / "decoder.onnx")
    packed = fp32_manifest["decoder_fusions"].get("packed_qkv", 0)
    assert packed == fp32_manifest["decoder_fusions"].get("gqa", 0)  # every GroupQueryAttention packed
    assert linears == 7 * FAMILIES[family].num_layers(json_config(root / "merged")) - 2 * packed + 1
    int4_ops = op_counts(bundles["int4"] / "decoder.onnx")
    assert int4_ops["MatMulNBits"] == linears and weight_matmuls(bundles["int4"] / "decoder.onnx") == 0
    int8_vision = op_counts(bundles["int4"] / "vision.onnx")
    assert int8_vision["MatMulNBits"] == weight_matmuls(fp32 / "vision.onnx") > 0
    # ...with onnxruntime's fused attention where the rewriter matches the tower (edgetune.export.fusions).
    vision_fusions = json.loads((bundles["int4"] / "manifest.json").read_text())["vision_fusions"]
    attention_fusions = sum(vision_fusions.get(name, 0) for name in ("mha1", "mha2", "sdpa_via_mha"))
    assert int8_vision["MultiHeadAttention"] == attention_fusions > 0
    # Sizes: 4 bits + one fp32 scale per 32 weights is 0.156x of fp32 (a tied head at 8 bits 0.281x;
    # norms stay fp32).
    size = lambda bundle, name: (bundle / f"{name}.onnx.data").stat().st_size  # noqa: E731
    head_bits = json.loads((bundles["int4"] / "manifest.json").read_text())["quantization"]["lm_head_bits"]
    assert head_bits == (8 if family in ("qwen2_vl", "qwen2_5_vl", "paligemma") else 4)
    expected = expected_int4_bytes(fp32 / "decoder.onnx", head_bits)
    assert expected * 0.9 < size(bundles["int4"], "decoder") < expected * 1.05 < 0.3 * size(fp32, "decoder")
    assert size(bundles["int8"], "decoder") < 0.3 * size(fp32, "decoder")
    assert size(bundles["fp16"], "decoder") < 0.52 * size(fp32, "decoder")
    # A tied table is stored once: embed.onnx reads the LM head's tensors from decoder.onnx.data.
    tied = fp32_manifest["text"]["tied_embeddings"]
    assert tied == (family in ("qwen2_vl", "qwen2_5_vl", "paligemma"))
    for bundle in [fp32, *bundles.values()]:
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["graphs"]["embed"]["data_files"] == (["decoder.onnx.data"] if tied else ["embed.onnx.data"])
        assert (bundle / "embed.onnx.data").exists() != tied
    # The device answers with onnxruntime alone, as in-process.
    image = tmp_path / "image.png"
    parity_image(0).save(image)
    result = subprocess.run([sys.executable, "-c", BLOCKED_ANSWERS, str(image), *map(str, bundles.values())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    blocked = json.loads(result.stdout.strip().splitlines()[-1])
    assert blocked["modules"] == []
    for bundle in bundles.values():
        expected = OnnxVLM.load(bundle).generate_ids(image, "What color is the shape?", max_new_tokens=5)
        assert blocked["answers"][str(bundle)] == expected and len(expected) > 0


def expected_int4_bytes(decoder_path, head_bits: int, block: int = 32) -> float:
    """decoder.onnx.data's size at int4 from the fp32 graph: 4 bits (the LM head head_bits) and one fp32
    scale per block (``block`` at 4 bits, eight_bit_block's at 8) for each linear weight,
    4 bytes for every other stored tensor."""
    import math

    from edgetune.export.precision import lm_head_node, weight_nodes

    model = onnx.load(str(decoder_path), load_external_data=False)
    head = lm_head_node(model).input[1]
    linears = {node.input[1] for node, _ in weight_nodes(model, "MatMul")}
    total = 0.0
    for init in model.graph.initializer:
        count = math.prod(init.dims)
        if init.name in linears:
            bits = head_bits if init.name == head else 4
            total += count * bits / 8 + count / (block if bits == 4 else eight_bit_block(init.dims[0], block)) * 4
        elif count * 4 > 1024:  # smaller tensors stay inside the protobuf
            total += count * 4
    return total


def json_config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


@pytest.mark.parametrize("variant", ["adapter", "llama_adapter-visual", "prefix", "adalink"])
def test_every_method_reaches_an_int4_bundle(variant, pipeline, tmp_path):
    """Each way a method reaches a bundle, at int4: adapters and LLaMA-Adapter (with its image_feature
    input) traced in the graph, prefix as a KV prefix (also at fp16, in the cache's dtype), AdaLink folded
    into an untied table. LoRA (folded like IA3) is every family's case above."""
    _, _, _, _, root = pipeline("llava", variant)
    precisions = ("int4", "fp16") if variant == "prefix" else ("int4",)
    manifests = export_bundles(root / "merged", {tmp_path / p: precision_options(p) for p in precisions}, eval_samples=0)
    for precision, manifest in zip(precisions, manifests):
        out = tmp_path / precision
        assert manifest["fidelity"][-1]["stage"].startswith(f"onnx {precision}")
        ids = OnnxVLM.load(out).generate_ids(parity_image(0), "What color is the shape?", max_new_tokens=4)
        assert len(ids) > 0
        if variant == "prefix":  # the prefix is stored in the cache's dtype
            prefix = load_file(str(out / manifest["kv_prefix"]["file"]))
            assert {array.dtype.name for array in prefix.values()} == {"float16" if precision == "fp16" else "float32"}


def test_a_bundle_past_its_tolerance_fails_and_leaves_nothing(tiny_llava_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.TOLERANCES, "int4", {"kl": 0.0})
    with pytest.raises(ParityError, match=r"decoder\.onnx at int4 \(vision int8\): mean KL .* is [0-9.e-]+, tolerance 0 \(max \|logit diff\|"):
        export_bundle(tiny_llava_dir, tmp_path / "bundle", "int4", eval_samples=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "k, block_size, expected",
    [(768, 32, 256), (1536, 32, 256), (576, 32, 64), (64, 32, 64), (48, 32, 32), (1536, 512, 512)],
)
def test_eight_bit_blocks_divide_the_layer_up_to_256(k, block_size, expected):
    """8-bit weights: the largest power of two dividing K (no padded block), at most 256, at least --block-size."""
    assert eight_bit_block(k, block_size) == expected


def test_block_size_wider_than_a_layer_keeps_that_layer_float(tiny_llava_dir, tmp_path):
    """The tiny LLM's linears have 64 or 128 input features: with 128-wide blocks, the 64-wide ones
    stay fp32 (the manifest counts them) instead of being padded or refused."""
    manifest = export_bundle(tiny_llava_dir, tmp_path / "bundle", "int8", block_size=128, eval_samples=0)
    decoder = manifest["quantization"]["graphs"]["decoder"]
    assert decoder["float_weights"] > 0 and decoder["quantized_weights"] > 0
    ops = op_counts(tmp_path / "bundle" / "decoder.onnx")
    assert ops["MatMulNBits"] == decoder["quantized_weights"]
    assert weight_matmuls(tmp_path / "bundle" / "decoder.onnx") == decoder["float_weights"]


@pytest.mark.parametrize(
    "options, needles",
    [
        (["--precision", "int3"], ["--precision int3", "fp32, fp16, int8, int4"]),
        (["--precision", "fp32", "--vision-precision", "int8"], ["--vision-precision int8", "--precision fp32", "accepted values are fp32"]),
        (["--precision", "int8", "--vision-precision", "int4"], ["--vision-precision int4", "with --precision int8", "fp32, fp16, int8"]),
        (["--precision", "int4", "--block-size", "24"], ["--block-size 24", "powers of two >= 16"]),
        (["--precision", "int4", "--block-size", "8"], ["--block-size 8", "powers of two >= 16"]),
    ],
    ids=["int3", "vision-without-decoder", "vision-below-decoder", "block-24", "block-8"],
)
def test_bad_export_options_are_one_line_and_write_nothing(options, needles, tiny_llava_dir, tmp_path):
    result = run("export", tiny_llava_dir, "--out", tmp_path / "bundle", *options)
    assert_user_error(result, *needles)
    assert list(tmp_path.iterdir()) == []


def test_ort_on_an_opset_the_converter_cannot_take(tiny_llava_dir, tmp_path, monkeypatch):
    import edgetune.export.graphs as graphs

    monkeypatch.setattr(graphs, "OPSET", 99)
    result = run("export", tiny_llava_dir, "--out", tmp_path / "bundle", "--ort")
    assert_user_error(result, "--ort:", "opsets", "not 99")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--ort: .*not 99"):
        monkeypatch.setattr(export_module, "OPSET", 99)
        export_bundle(tiny_llava_dir, tmp_path / "bundle", ort=True)
    assert list(tmp_path.iterdir()) == []


def test_int4_ort_twins_answer_as_the_onnx_graphs(tiny_llava_dir, tmp_path):
    """--ort at int4: the ORT-format graphs (GatherBlockQuantized over uint8 data, MatMulNBits) load,
    stay within the precision's limits, and give the .onnx graphs' greedy tokens."""
    manifest = export_bundle(tiny_llava_dir, tmp_path / "bundle", "int4", eval_samples=0, ort=True)
    twin = manifest["ort"]["fidelity"]
    assert twin["kl"] <= manifest["tolerances"]["limits"]["kl"]
    assert abs(twin["kl"] - manifest["fidelity"][-1]["kl"]) < 0.05
    onnx_vlm = OnnxVLM.load(tmp_path / "bundle", model_format="onnx")
    ort_vlm = OnnxVLM.load(tmp_path / "bundle", model_format="ort")
    for index in range(2):
        image = parity_image(index)
        assert ort_vlm.generate_ids(image, "What color is the shape?", max_new_tokens=6) == onnx_vlm.generate_ids(
            image, "What color is the shape?", max_new_tokens=6)
