"""The ORT format (edgetune.export.mobile) on the tiny LLaVA: the converter's files, the same greedy
ids as the .onnx graphs (also with torch blocked, and with int4 contrib ops and a data file shared
between graphs), the usability summary, and the runtime's model_format choice and missing files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgetune.errors import UserError
from edgetune.export import export_bundle
from edgetune.export.mobile import add_ort_models, ort_format_problem, read_usability_log
from edgetune.export.parity import parity_image
from edgetune.runtime import OnnxVLM, load_manifest
from edgetune.runtime.bundle import MANIFEST_FILE
from tests.conftest import TORCH_BLOCKER

MAX_NEW = 12
PROMPTS = ["What color is the shape?", "Describe the picture. What shape is this?"]


@pytest.fixture(scope="module")
def bundle_dir(tiny_llava_dir, tmp_path_factory):
    """An fp32 export with the ORT section added to its manifest."""
    out = tmp_path_factory.mktemp("ort") / "bundle"
    manifest = export_bundle(tiny_llava_dir, out)
    manifest["ort"] = add_ort_models(out, manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def onnx_ids(bundle_dir):
    vlm = OnnxVLM.load(bundle_dir, threads=2, model_format="onnx")
    return [vlm.generate_ids(parity_image(case), PROMPTS[case], MAX_NEW) for case in (0, 1)]


def test_ort_files_and_operator_config(bundle_dir):
    section = load_manifest(bundle_dir)["ort"]
    assert section["graphs"] == {"vision": "vision.ort", "embed": "embed.ort", "decoder": "decoder.ort"}
    for file in [*section["graphs"].values(), section["required_operators"]]:
        assert (bundle_dir / file).stat().st_size > 0
    assert not [path.name for path in bundle_dir.iterdir() if path.name.startswith(".ort-") or path.name.endswith(".optimized.onnx")]
    config = (bundle_dir / "required_operators.config").read_text()
    ops = {op for line in config.splitlines() if not line.startswith("#") for op in line.split(";")[2].split(",")}
    decoder = onnx.load(str(bundle_dir / "decoder.onnx"), load_external_data=False)
    assert {"MatMul", "Softmax", "Gather", "Conv"} <= ops  # the decoder's and the vision tower's
    assert {node.op_type for node in decoder.graph.node} & ops >= {"MatMul", "GroupQueryAttention"}  # fused attention
    assert "# - decoder.ort\n" in config and ".ort-" not in config  # model names, not the private folder's paths


def test_mobile_usability_summary(bundle_dir):
    usability = load_manifest(bundle_dir)["ort"]["mobile_usability"]
    assert set(usability) == {"vision", "embed", "decoder"}
    decoder = usability["decoder"]
    assert decoder["recommendation"] == "cpu"  # dynamic shapes and ops NNAPI/CoreML lack
    for ep in ("nnapi", "coreml_neuralnetwork", "coreml_mlprogram"):
        assert 0 < decoder[ep]["supported_nodes"] < decoder[ep]["nodes"]
        assert decoder[ep]["suitable"] == "NO" and decoder[ep]["fixed_shapes"]["suitable"] in ("YES", "MAYBE", "NO")
        assert decoder[ep]["fixed_shapes"]["supported_nodes"] > decoder[ep]["supported_nodes"]
    assert "ai.onnx:Range" in decoder["nnapi"]["unsupported_ops"]
    # the one-Gather embed graph would fit NNAPI entirely once its shapes were fixed
    assert usability["embed"]["nnapi"]["fixed_shapes"] == {"partitions": 1, "supported_nodes": 1, "nodes": 1, "suitable": "YES"}


def test_usability_log_is_read_line_by_line():
    log = """INFO:  Checking NNAPI
INFO:  3 partitions with a total of 22/203 nodes can be handled by the NNAPI EP.
INFO:  	Unsupported ops: ai.onnx:And,com.microsoft:MatMulNBits
INFO:  Model should perform well with NNAPI as is: NO
INFO:  Partition information if the model was updated to make the shapes fixed:
INFO:  1 partitions with a total of 200/203 nodes can be handled by the NNAPI EP.
INFO:  	Unsupported ops: ai.onnx:And,com.microsoft:MatMulNBits
INFO:  Model should perform well with NNAPI if modified to have fixed input shapes: YES
INFO:  As NNAPI or CoreML may provide benefits with this model it is recommended to compare the performance ..."""
    assert read_usability_log(log) == {
        "recommendation": "try_nnapi_coreml",
        "nnapi": {"partitions": 3, "supported_nodes": 22, "nodes": 203, "suitable": "NO",
                  "unsupported_ops": ["ai.onnx:And", "com.microsoft:MatMulNBits"],
                  "fixed_shapes": {"partitions": 1, "supported_nodes": 200, "nodes": 203, "suitable": "YES"}},
    }
    assert read_usability_log("something else entirely") == {"recommendation": None}


@pytest.mark.parametrize("case", [0, 1])
def test_ort_answers_the_same_ids_as_onnx(bundle_dir, onnx_ids, case):
    vlm = OnnxVLM.load(bundle_dir, threads=2, model_format="ort")
    assert len(onnx_ids[case]) == MAX_NEW  # random weights: no eos, all 12 steps compared
    assert vlm.generate_ids(parity_image(case), PROMPTS[case], MAX_NEW) == onnx_ids[case]


BLOCK_TORCH = TORCH_BLOCKER + """
import json

from PIL import Image
from edgetune.runtime import OnnxVLM

vlm = OnnxVLM.load(sys.argv[1], model_format="ort")
ids = [vlm.generate_ids(Image.open(path), prompt, max_new_tokens=12) for path, prompt in json.loads(sys.argv[2])]
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"ids": ids, "modules": blocked}))
"""


def test_ort_runs_with_torch_and_transformers_blocked(bundle_dir, onnx_ids, tmp_path):
    cases = []
    for case in (0, 1):
        parity_image(case).save(tmp_path / f"{case}.png")  # PNG is lossless
        cases.append([str(tmp_path / f"{case}.png"), PROMPTS[case]])
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(bundle_dir), json.dumps(cases)], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"ids": onnx_ids, "modules": []}


def test_model_format_choice_and_missing_files(bundle_dir, onnx_ids, tmp_path):
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (copy / "decoder.onnx").write_bytes(b"not a model")  # "auto" must not read it
    assert OnnxVLM.load(copy).generate_ids(parity_image(0), PROMPTS[0], MAX_NEW) == onnx_ids[0]
    with pytest.raises(UserError, match=r"decoder\.onnx cannot be loaded by onnxruntime"):
        OnnxVLM.load(copy, model_format="onnx")
    with pytest.raises(UserError, match=r"model_format 'tflite'"):
        OnnxVLM.load(copy, model_format="tflite")

    for name in ("decoder.ort", "required_operators.config"):
        (copy / name).rename(copy / "aside")
        with pytest.raises(UserError, match=rf"bundle/{name.replace('.', '[.]')} is missing; re-run `edgetune export`"):
            load_manifest(copy)
        (copy / "aside").rename(copy / name)

    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    del manifest["ort"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    shutil.copy(bundle_dir / "decoder.onnx", copy / "decoder.onnx")
    with pytest.raises(UserError, match=r"manifest\.json has no 'ort' section .*re-run `edgetune export` with --ort"):
        OnnxVLM.load(copy, model_format="ort")
    assert OnnxVLM.load(copy).generate_ids(parity_image(0), PROMPTS[0], MAX_NEW) == onnx_ids[0]  # auto: the .onnx


def test_int4_contrib_ops_and_a_data_file_shared_between_graphs(bundle_dir, tmp_path):
    """MatMulNBits in the decoder, and embed.onnx's table read from decoder.onnx.data (as a tied
    table is shared): the converter must find both, and the .ort graphs answer as the .onnx ones."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = tmp_path / "bundle"
    copy.mkdir()
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    del manifest["ort"]
    for name in ("vision.onnx", "vision.onnx.data", "embed.onnx", "embed.onnx.data", "tokenizer.json"):
        shutil.copy(bundle_dir / name, copy / name)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(bundle_dir / "decoder.onnx")), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(copy / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data")

    embed = onnx.load(str(copy / "embed.onnx"))  # the table moves to the end of decoder.onnx.data
    (table,) = [init for init in embed.graph.initializer if len(init.dims) == 2]
    with open(copy / "decoder.onnx.data", "ab") as data:
        offset = data.tell()
        data.write(table.raw_data)
    length = len(table.raw_data)
    table.ClearField("raw_data")
    del table.external_data[:]
    table.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "decoder.onnx.data"), ("offset", str(offset)), ("length", str(length))):
        table.external_data.add(key=key, value=value)
    onnx.save_model(embed, str(copy / "embed.onnx"))
    (copy / "embed.onnx.data").unlink()
    manifest["graphs"]["embed"]["data_files"] = ["decoder.onnx.data"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))

    manifest["ort"] = add_ort_models(copy, manifest)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    config = (copy / "required_operators.config").read_text()
    assert "MatMulNBits" in [line for line in config.splitlines() if line.startswith("com.microsoft;")][0]
    assert "com.microsoft:MatMulNBits" in manifest["ort"]["mobile_usability"]["decoder"]["nnapi"]["unsupported_ops"]
    assert sorted(path.name for path in copy.iterdir()) == sorted(
        ["decoder.onnx", "decoder.onnx.data", "embed.onnx", "vision.onnx", "vision.onnx.data", "tokenizer.json",
         MANIFEST_FILE, "vision.ort", "embed.ort", "decoder.ort", "required_operators.config"])
    from_onnx = OnnxVLM.load(copy, threads=2, model_format="onnx")
    from_ort = OnnxVLM.load(copy, threads=2, model_format="ort")
    for case in (0, 1):
        image, prompt = parity_image(case), PROMPTS[case]
        assert from_ort.generate_ids(image, prompt, MAX_NEW) == from_onnx.generate_ids(image, prompt, MAX_NEW)


def test_opsets_the_converter_takes():
    assert ort_format_problem(18) is None  # the bundles' opset (edgetune.export.graphs.OPSET)
    problem = ort_format_problem(1000)
    assert problem and "takes ONNX opsets 7 to" in problem and "not 1000" in problem
    assert "not 6" in ort_format_problem(6)


def test_a_graph_that_does_not_convert_is_named(bundle_dir, tmp_path):
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    decoder = onnx.load(str(copy / "decoder.onnx"), load_external_data=False)
    decoder.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(decoder, str(copy / "decoder.onnx"))
    with pytest.raises(UserError, match=r"^decoder\.onnx cannot be converted to the ORT format: .*NoSuchOp"):
        add_ort_models(copy, manifest)
    assert not [path.name for path in copy.iterdir() if path.name.startswith(".ort-")]
