"""Decoder fusions: onnxruntime's fused transformer operators in place of the traced attention.

The dynamo-traced decoder spells every layer out: the RMS norms, the rotary embedding, the KV
cache's concatenation, GQA's repeat of K and V to every query head, the mask and softmax(QK^T)V,
about 70 nodes a layer; and on every decoded token it transposes, expands and copies the whole
cache. onnxscript's rewriter for onnxruntime (``onnxscript.rewriter.ort_fusions.optimize_for_ort``,
the tool onnxruntime's own dynamo-export pipeline uses) replaces those patterns with onnxruntime's
contrib operators: ``GroupQueryAttention`` (rotary, cache append and attention in one kernel),
``SkipSimplifiedLayerNormalization``, ``SimplifiedLayerNormalization``. On SmolVLM-256M's decoder a
decode step goes from 2,097 nodes to 374. The graph's inputs and outputs do not change.

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

# Fusions whose attention kernel reads row lengths from the mask (right padding only).
ATTENTION_FUSIONS = {"sdpa", "gqa", "packed_qkv_for_gqa", "mha1", "mha2", "mha_scale", "mha_bias", "attention"}


def fuse_decoder(decoder_path: Path, traced_path: Path) -> dict[str, int]:
    """Rewrite ``decoder_path`` (and its external data) with onnxruntime's fused operators, moving the
    traced graph to ``traced_path`` (its data to ``traced_path.data``; restore with ``restore_traced``).
    Returns the rewriter's count per fusion applied; empty when nothing matched (nothing is moved)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    model = ir.load(str(decoder_path))
    model, counts = optimize_for_ort(model)
    applied = {name: count for name, count in counts.items() if count}
    if not applied:
        return {}
    # The rewritten graph reads its weights from the traced data file until saved: write beside it.
    scratch = decoder_path.with_name(f".{decoder_path.name}.fused")
    ir.save(model, str(scratch), external_data=f"{scratch.name}.data")
    del model
    move_graph(decoder_path, traced_path, rename_data=False)
    move_graph(scratch, decoder_path)
    return applied


def restore_traced(traced_path: Path, decoder_path: Path) -> None:
    """Put the traced graph that ``fuse_decoder`` moved aside back at ``decoder_path``."""
    move_graph(traced_path, decoder_path, rename_data=False)

