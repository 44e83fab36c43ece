"""Decoder fusions: onnxruntime's fused transformer operators in place of the traced attention.

The dynamo-traced decoder spells every layer out: the RMS norms, the rotary embedding, the KV
cache's concatenation, GQA's repeat of K and V to every query head, the mask and softmax(QK^T)V,
about 70 nodes a layer; and on every decoded token it transposes, expands and copies the whole
cache. onnxscript's rewriter for onnxruntime (``onnxscript.rewriter.ort_fusions.optimize_for_ort``,
the tool onnxruntime's own dynamo-export pipeline uses) replaces those patterns with onnxruntime's
contrib operators: ``GroupQueryAttention`` (rotary, cache append and attention in one kernel),
``SkipSimplifiedLayerNormalization``, ``SimplifiedLayerNormalization``. On SmolVLM-256M's decoder a
decode step goes from 2,097 nodes to 374. The graph's inputs and outputs do not change.

Then ``pack_qkv`` joins each layer's query, key and value projections into one MatMul whose output
GroupQueryAttention takes as packed QKV (its layout when ``key`` and ``value`` are absent; the
layout onnxruntime-genai's model builder writes): one weight-only matmul a layer instead of three
after quantization, and no separate transposes of K and V inside the kernel (SmolVLM-256M, int4,
2 threads: a decode step from 211 MatMulNBits to 151).

``fuse_vision`` applies the same rewriter to a vision graph whose linear layers are already weight-only
quantized (int8, MatMulNBits): onnxruntime's MultiHeadAttention, SkipLayerNormalization and FastGelu
in place of SigLIP/CLIP/ViT's spelled-out attention and norms (SmolVLM-256M: 12 % less time in the
vision graph). The fp32 graph is left as traced: there the rewriter packs Q, K and V into an
``Attention`` node whose weights a later quantization would no longer see.

``keep_last_logits`` (every decoder, fused or not) lets the caller ask for the logits of the last
positions only: generation reads one row of the prefill's [seq, vocab], and at SmolVLM-256M's
1,161-token prompt the full rows are 66 GFLOP of LM head and 229 MB written.

One difference in meaning: GroupQueryAttention takes each row's length from the attention mask and
assumes a row's real tokens come first (right padding), so a left-padded row would attend to its
padding. A fused bundle says so in its manifest (``text.padded_rows``: ``"one_at_a_time"``) and the
runtime runs a padded batch one row at a time, each without its padding; batch 1 and unpadded
batches run as they are.

The export checks the fused graph against PyTorch like any other (FP32_TOLERANCE, batch 1 and a
left-padded batch 2); a family whose attention the rewriter fuses wrongly fails that check, and the
export then ships the traced graph instead (edgetune.export.bundle).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgetune.export.precision import move_graph
from edgetune.runtime.bundle import LOGITS_TO_KEEP

# Fusions whose attention kernel reads row lengths from the mask (right padding only).
ATTENTION_FUSIONS = {"sdpa", "gqa", "packed_qkv_for_gqa", "mha1", "mha2", "mha_scale", "mha_bias", "attention"}


def fuse_decoder(decoder_path: Path, traced_path: Path) -> dict[str, int]:
    """Rewrite ``decoder_path`` (and its external data) with onnxruntime's fused operators and packed
    QKV, moving the traced graph to ``traced_path`` (its data to ``traced_path.data``; restore with
    ``restore_traced``). Returns the count per fusion applied; empty when nothing matched (nothing is
    moved)."""
    model, applied = rewrite_for_ort(decoder_path)
    packed = pack_qkv(model)
    if packed:
        applied["packed_qkv"] = packed
    if not applied:
        return {}
    scratch = save_beside(model, decoder_path)
    del model
    move_graph(decoder_path, traced_path, rename_data=False)
    move_graph(scratch, decoder_path)
    return applied


def fuse_vision(vision_path: Path) -> dict[str, int]:
    """Rewrite the quantized ``vision_path`` (and its data file) with onnxruntime's fused operators;
    returns the count per fusion applied (empty, and the graph untouched, when none matched)."""
    model, applied = rewrite_for_ort(vision_path)
    if applied:
        scratch = save_beside(model, vision_path)
        del model
        move_graph(scratch, vision_path)
    return applied


def rewrite_for_ort(path: Path):
    """(graph ``path`` as an onnx_ir model rewritten by ``optimize_for_ort``, the count per fusion
    applied, zeros left out)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    model, counts = optimize_for_ort(ir.load(str(path)))
    return model, {name: count for name, count in counts.items() if count}


def save_beside(model, path: Path) -> Path:
    """Save ``model`` as a hidden scratch graph beside ``path`` (with its own data file) and return it:
    the rewritten graph reads its weights from ``path``'s data file until saved."""
    import onnx_ir as ir

    scratch = path.with_name(f".{path.name}.fused")
    ir.save(model, str(scratch), external_data=f"{scratch.name}.data")
    return scratch


def restore_traced(traced_path: Path, decoder_path: Path) -> None:
    """Put the traced graph that ``fuse_decoder`` moved aside back at ``decoder_path``."""
    move_graph(traced_path, decoder_path, rename_data=False)


def pack_qkv(model) -> int:
    """Give every GroupQueryAttention whose query, key and value are MatMuls of one input by constant
    weights (each optionally plus a constant bias) a single MatMul with the three weights (and biases)
    side by side, [in, (heads + 2 * kv_heads) * head_dim], as its packed QKV input. ``model`` is an
    onnx_ir model, edited in place; returns the number of attention nodes packed."""
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    packed = 0
    for attention in [node for node in model.graph if node.op_type == "GroupQueryAttention"]:
        projections = [_projection(value) for value in attention.inputs[:3]]
        if None in projections or len({matmul.inputs[0] for matmul, _ in projections}) != 1:
            continue
        biases = [bias for _, bias in projections]
        if any(bias is not None for bias in biases) and None in biases:
            continue
        name = f"{attention.name or 'attention'}.qkv"
        weight = np.concatenate([matmul.inputs[1].const_value.numpy() for matmul, _ in projections], axis=1)
        joined = ir.Value(name=f"{name}.weight", const_value=ir.tensor(weight, name=f"{name}.weight"))
        model.graph.register_initializer(joined)
        matmul = ir.node("MatMul", [projections[0][0].inputs[0], joined], name=f"{name}.matmul")
        model.graph.insert_before(attention, matmul)
        qkv = matmul.outputs[0]
        if biases[0] is not None:
            bias = np.concatenate([value.const_value.numpy() for value in biases])
            joined_bias = ir.Value(name=f"{name}.bias", const_value=ir.tensor(bias, name=f"{name}.bias"))
            model.graph.register_initializer(joined_bias)
            add = ir.node("Add", [qkv, joined_bias], name=f"{name}.add")
            model.graph.insert_before(attention, add)
            qkv = add.outputs[0]
        qkv.name = f"{name}.out"
        attention.replace_input_with(0, qkv)
        attention.replace_input_with(1, None)
        attention.replace_input_with(2, None)
        packed += 1
    if packed:
        RemoveUnusedNodesPass()(model)
        for value in list(model.graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                del model.graph.initializers[value.name]
    return packed


def _projection(value):
    """(MatMul node, bias value or None) when ``value`` is MatMul(x, constant) [+ constant], else None."""
    node = value.producer() if value is not None else None
    bias = None
    if node is not None and node.op_type == "Add":
        constants = [operand for operand in node.inputs if operand.const_value is not None]
        others = [operand for operand in node.inputs if operand.const_value is None]
        if len(constants) != 1 or len(others) != 1 or constants[0].const_value.shape.rank() != 1:
            return None
        bias, node = constants[0], others[0].producer()
    if node is None or node.op_type != "MatMul" or node.inputs[1].const_value is None:
        return None
    if node.inputs[1].const_value.shape.rank() != 2 or len(node.outputs[0].uses()) != 1:
        return None
    return node, bias


def keep_last_logits(decoder_path: Path) -> None:
    """Add the optional decoder input ``logits_to_keep`` (int64 scalar; transformers' name): the LM head
    reads only the last ``logits_to_keep`` positions of the hidden states, so ``logits`` is [batch,
    logits_to_keep, vocab]; 0, its default (an initializer of the same name, which a caller may
    override), keeps every position. Edits decoder.onnx only; the data file is not rewritten."""
    import numpy as np
    import onnx_ir as ir

    model = ir.load(str(decoder_path))
    head = model.graph.outputs[0].producer()  # logits, through Casts (fp16 bundles) from the LM head
    while head.op_type == "Cast":
        head = head.inputs[0].producer()
    if head.op_type != "MatMul":
        raise ValueError(f"{decoder_path}: logits come from a {head.op_type} node, not the LM head's MatMul")
    def constant(name: str, values) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.array(values, np.int64), name=name))
        model.graph.register_initializer(value)
        return value

    keep = constant(LOGITS_TO_KEEP, 0)
    keep.type, keep.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
    model.graph.inputs.append(keep)
    count = ir.node("Reshape", [keep, constant("logits_to_keep.shape", [1])], name="logits_to_keep.count")
    start = ir.node("Neg", [count.outputs[0]], name="logits_to_keep.start")
    end, axis = constant("logits_to_keep.end", [np.iinfo(np.int64).max]), constant("logits_to_keep.axis", [1])
    kept = ir.node("Slice", [head.inputs[0], start.outputs[0], end, axis], name="logits_to_keep.slice")
    for node in (count, start, kept):
        model.graph.insert_before(head, node)
    head.replace_input_with(0, kept.outputs[0])
    ir.save(model, str(decoder_path))
