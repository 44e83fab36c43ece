"""The decoder's fused attention (edgetune.export.fusions): onnxruntime's operators replace the traced
attention when they match PyTorch, the runtime runs left-padded rows one at a time for them, and a
fused graph that fails the fp32 check is replaced by the traced one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from edgetune.export import ParityError, bundle as export_module, export_bundle
from edgetune.export.parity import parity_image
from edgetune.runtime import OnnxVLM


def op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def fused(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "bundle"
    return out, export_bundle(tiny_llava_dir, out, eval_samples=0)


def test_the_decoder_is_fused_and_says_how_padded_rows_run(fused):
    out, manifest = fused
    ops = op_counts(out / "decoder.onnx")
    layers = manifest["text"]["num_layers"]
    assert manifest["decoder_fusions"]["gqa"] == layers and ops["GroupQueryAttention"] == layers
    assert ops["Transpose"] == 0 and ops["Expand"] == 0  # no per-step copies of the cache
    # One MatMul a layer feeds the attention its packed query, key and value.
    assert manifest["decoder_fusions"]["packed_qkv"] == layers
    attention = [node for node in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node
                 if node.op_type == "GroupQueryAttention"]
    assert all(node.input[1] == node.input[2] == "" for node in attention)
    assert manifest["text"]["padded_rows"] == "one_at_a_time" and manifest["format_version"] == 4
    assert max(check["max_abs_diff"] for check in manifest["parity"]["checks"]) < 1e-4
    # The traced decoder kept aside during the check is not counted in the fp32 bundle's size.
    on_disk = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    assert abs(manifest["fidelity"][-1]["bundle_mb"] - on_disk) < 0.01 * on_disk


def test_a_left_padded_batch_answers_as_each_row_alone(fused):
    """Prefill and two decode steps on a batch whose second row is left-padded: every real position's
    logits equal the row's own batch-1 run."""
    out, _ = fused
    vlm = OnnxVLM.load(out)
    images = [vlm.encode_image(parity_image(i)) for i in range(2)]
    rows = [vlm.prompt_ids("What color is the shape?", images[0]), vlm.prompt_ids("Shape?", images[1])]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(row)) + row for row in rows])
    mask = np.array([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    logits, past = vlm.forward(ids, mask, images=images)
    alone = [vlm.forward(np.array([row]), np.ones((1, len(row)), np.int64), images=[image]) for row, image in zip(rows, images)]
    for i, (row_logits, _) in enumerate(alone):
        assert np.abs(logits[i, width - len(rows[i]) :] - row_logits[0]).max() < 1e-5
        assert not logits[i, : width - len(rows[i])].any()  # padding positions
    pasts = [row_past for _, row_past in alone]
    for _ in range(2):
        step = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = vlm.forward(step, mask, past)
        for i in range(2):
            row_logits, pasts[i] = vlm.forward(step[i : i + 1], np.ones((1, int(mask[i].sum())), np.int64), pasts[i])
            assert np.abs(logits[i, -1] - row_logits[0, -1]).max() < 1e-5


def test_the_in_place_cache_answers_as_the_copied_one(fused):
    """GroupQueryAttention reading and writing a preallocated buffer (OnnxVLM.kv_buffer, what
    generation uses) gives the same logits, bit for bit, as the cache passed in and out as arrays."""
    out, _ = fused
    vlm = OnnxVLM.load(out)
    image = vlm.encode_image(parity_image(0))
    ids = np.array([vlm.prompt_ids("What color is the shape?", image)])
    mask = np.ones_like(ids)
    capacity = ids.shape[1] + 3
    buffer = vlm.kv_buffer(1, capacity)
    assert buffer is not None and buffer[vlm.past_names[0]].shape[2] == capacity
    copied, past = vlm.forward(ids, mask, images=[image])
    in_place, cache = vlm.forward(ids, mask, buffer, images=[image])
    assert np.array_equal(copied, in_place)
    for _ in range(3):
        step = copied[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        copied, past = vlm.forward(step, mask, past)
        in_place, cache = vlm.forward(step, mask, cache)
        assert np.array_equal(copied, in_place)
    full = mask.shape[1]
    assert np.array_equal(cache[vlm.past_names[0]][:, :, :full], past[vlm.past_names[0]])
    # The prefill as generation runs it: the LM head on the last position only, the same row.
    last, _ = vlm.forward(ids, np.ones_like(ids), vlm.kv_buffer(1, capacity), images=[image], logits_to_keep=1)
    everything, _ = vlm.forward(ids, np.ones_like(ids), images=[image])
    assert last.shape == (1, 1, everything.shape[-1]) and np.abs(last[0, 0] - everything[0, -1]).max() < 1e-5
    with pytest.raises(ValueError, match="do not fit a KV buffer"):
        vlm.forward(step, np.ones((1, capacity + 1), np.int64), cache)


def test_a_fused_decoder_that_fails_the_check_is_replaced_by_the_traced_one(tiny_llava_dir, tmp_path, monkeypatch):
    checked = []

    def fail_first(checks):
        checked.append(checks)
        if len(checked) == 1:
            raise ParityError("decoder.onnx differs from PyTorch by 1 (a test)")
        return real(checks)

    real = export_module.check_fp32
    monkeypatch.setattr(export_module, "check_fp32", fail_first)
    manifest = export_bundle(tiny_llava_dir, tmp_path / "bundle", eval_samples=0)
    assert len(checked) == 2 and manifest["decoder_fusions"] == {} and "padded_rows" not in manifest["text"]
    assert manifest["format_version"] == 1
    ops = op_counts(tmp_path / "bundle" / "decoder.onnx")
    assert ops["GroupQueryAttention"] == 0 and ops["MatMul"] > 0
    assert [path.name for path in tmp_path.iterdir()] == ["bundle"]  # no traced decoder left beside it
    vlm = OnnxVLM.load(tmp_path / "bundle")
    assert vlm.kv_buffer(1, 8) is None  # the traced attention concatenates: its cache grows each step
    assert len(vlm.generate_ids(parity_image(0), "What color?", max_new_tokens=3)) > 0
