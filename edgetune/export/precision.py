"""Bundle precisions: passes over the traced fp32 graphs with onnxruntime's own quantization tools.

Nothing here re-traces a model or quantizes by hand; each precision is one well-kept tool:

    int4, int8  onnxruntime.quantization's MatMulNBitsQuantizer (RTN, block-wise, weight-only): every
                MatMul with a constant weight [K, N] becomes ``MatMulNBits`` (com.microsoft), 4 or 8
                bits per weight plus one fp32 scale (and, asymmetric, a zero point) per block of
                input features: ``block_size`` at 4 bits, ``eight_bit_block(K)`` at 8 bits (see
                there). Activations stay fp32; ``accuracy_level`` picks the
                kernel's compute type (0: the default fp32 path, 4: int8 activations per block,
                the CPU's fastest; see onnxruntime's ContribOperators.md, MatMulNBits).
                The token embedding table becomes ``GatherBlockQuantized`` (4 or 8 bits, quantized
                along the hidden dim with the same block size).
    fp16        onnxruntime.transformers.float16.convert_float_to_float16: fp16 weights and KV cache;
                the decoder keeps fp32 ``inputs_embeds`` and ``logits``, embed.onnx and vision.onnx
                keep fp32 outputs, so the runtime writes fp32 image rows into fp32 token rows as at fp32.

A weight whose input features K are fewer than the block size stays float (fp32): a block never
spans padding, and real models (K >= 576) never meet the rule; the manifest counts such weights.

Tied tables are stored once. When the LM head's weight is the embedding table transposed (Qwen2-VL-2B,
PaliGemma), embed.onnx is rewritten to read the decoder's LM-head tensor where it lies in
decoder.onnx.data: at fp32/fp16 as ``Gather(axis=1)`` on the [hidden, vocab] weight then a transpose;
at int4/int8 as ``GatherBlockQuantized`` over MatMulNBits' own bytes, which have the layout
GatherBlockQuantized takes for uint8 data (per vocabulary row, blocks along hidden), so the embedding
rows are exactly the LM head's dequantized rows.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetune.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BITS = {"int4": 4, "int8": 8}
# A vision graph is never quantized more than its decoder. It defaults to int8 under an int4 decoder
# (it runs once per image, so its bits cost size, not decode speed); int4 is the user's choice.
VISION_PRECISIONS = ("fp32", "fp16", "int8", "int4")
DEFAULT_VISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int8"}
DEFAULT_BLOCK_SIZE = 32
# 8-bit weights take blocks up to this wide (see eight_bit_block).
EIGHT_BIT_BLOCK = 256
DEFAULT_ACCURACY_LEVEL = 4
MSFT = "com.microsoft"


@dataclass(frozen=True)
class PrecisionOptions:
    """What a bundle's graphs are stored in. Build with ``precision_options`` (it validates)."""

    precision: str = "fp32"  # the decoder's (and embed's) weights
    vision_precision: str = "fp32"
    block_size: int = DEFAULT_BLOCK_SIZE  # input features per block of 4-bit weights; 8-bit: eight_bit_block
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # MatMulNBits compute type (int4/int8)
    symmetric: bool = True  # int4/int8: zero point fixed at the middle of the range
    # int4 bundles: the LM head's bits, 4 or 8 (and so a table tied to it); None: 8 when the table is
    # tied (it is then the model's input as well as its output), else 4. Resolved by ``for_table``.
    lm_head_bits: int | None = None

    def manifest_section(self) -> dict:
        return {
            "decoder": self.precision,
            "vision": self.vision_precision,
            "block_size": self.block_size if self.quantized else None,
            "accuracy_level": self.accuracy_level if self.quantized else None,
            "symmetric": self.symmetric if self.quantized else None,
            "lm_head_bits": self.lm_head_bits if self.precision in BITS else None,
        }

    def for_table(self, tied: bool) -> PrecisionOptions:
        """These options with lm_head_bits decided for a tied or untied embedding table."""
        return replace(self, lm_head_bits=self.lm_head_bits or (8 if tied else 4))

    @property
    def quantized(self) -> bool:
        return self.precision in BITS or self.vision_precision in BITS


def precision_options(
    precision: str = "fp32",
    vision_precision: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    symmetric: bool = True,
    lm_head_bits: int | None = None,
) -> PrecisionOptions:
    """Check the export options before anything is written; UserError names the option."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: accepted values are {', '.join(PRECISIONS)}")
    if vision_precision is None:
        vision_precision = DEFAULT_VISION[precision]
    allowed = [p for p in VISION_PRECISIONS if PRECISIONS.index(p) <= PRECISIONS.index(precision)]
    if vision_precision not in allowed:
        raise UserError(
            f"--vision-precision {vision_precision}: with --precision {precision} the accepted values are "
            f"{', '.join(allowed)} (the vision graph is never quantized more than the decoder)"
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"--block-size {block_size}: accepted values are powers of two >= 16 (16, 32, 64, 128, ...)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"--accuracy-level {accuracy_level}: accepted values are 0, 1, 2, 3, 4 (MatMulNBits' compute types)")
    if lm_head_bits not in (None, 4, 8):
        raise UserError(f"--lm-head-bits {lm_head_bits}: accepted values are 4, 8")
    return PrecisionOptions(precision, vision_precision, block_size, accuracy_level, symmetric, lm_head_bits)


# ---- one graph at a time ----------------------------------------------------------------------


def convert_graph(source: Path, target: Path, precision: str, options: PrecisionOptions, keep_fp32: list[str],
                  op_type: str = "MatMul") -> dict:
    """Write the fp32 graph ``source`` (with its external data) as ``target`` at ``precision``.

    keep_fp32: graph inputs and outputs that stay float32 at fp16. op_type: the weights quantized at
    int4/int8: "MatMul" (linear layers) or "Gather" (the embedding table). Returns the manifest's
    record of what was done: how many weights were quantized and how many kept float.
    """
    if precision == "fp32":
        shutil.copyfile(source, target)
        data = source.with_name(source.name + ".data")
        if data.exists():  # a tied embed.onnx has none: it reads decoder.onnx.data
            shutil.copyfile(data, target.with_name(target.name + ".data"))
        return {}
    model = onnx.load(str(source))
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        outputs_from_nodes(model)
        with quiet_quantizer():
            model = convert_float_to_float16(model, keep_io_types=keep_fp32, disable_shape_infer=True)
        report = {}
    elif op_type == "MatMul" and source.stem == "decoder" and precision == "int4" and (options.lm_head_bits or 4) != 4:
        gemm_to_matmul(model)
        # The LM head at its own width: the rest first (head excluded), then the head alone.
        head = lm_head_node(model).name
        model, report = quantize_weights(model, BITS[precision], options, op_type, skip={head})
        model, head_report = quantize_weights(model, options.lm_head_bits, options, op_type, only={head})
        report = {key: report[key] + head_report[key] for key in report}
        report["block_sizes"] = sorted(set(report["block_sizes"]))
    else:
        gemm_to_matmul(model)
        model, report = quantize_weights(model, BITS[precision], options, op_type)
    save_with_external_data(model, target)
    return report


def gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Gemm with a constant weight (what torch.onnx writes for a linear layer on 2-D input, e.g.
    Qwen2-VL's vision blocks over [patches, dim]) -> MatMul on the [K, N] weight (+ Add for a bias),
    the form MatMulNBitsQuantizer takes."""
    inits = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(list(model.graph.node)):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = inits[node.input[1]]
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(weight).T.copy()
            model.graph.initializer.remove(weight)
            weight = numpy_helper.from_array(array, weight.name)
            model.graph.initializer.append(weight)
            inits[weight.name] = weight
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], weight.name], [product], name=f"{node.name}_matmul")]
        if has_bias:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, added in enumerate(new):
            model.graph.node.insert(position + offset, added)


def outputs_from_nodes(model: onnx.ModelProto) -> None:
    """A graph output that is an initializer (LLaVA-NeXT's image_newline) gets an Identity node in
    front, so that the fp16 converter can cast it back to fp32 under its own name."""
    for init in model.graph.initializer:
        if any(output.name == init.name for output in model.graph.output):
            stored = f"{init.name}_value"
            model.graph.node.append(helper.make_node("Identity", [stored], [init.name], name=f"{init.name}_output"))
            init.name = stored


def weight_nodes(model: onnx.ModelProto, op_type: str) -> list[tuple[onnx.NodeProto, int]]:
    """(node, input features K) of every ``op_type`` node whose weight is a constant 2-D tensor: a
    linear layer's [K, N] for MatMul, a [vocab, K] table for Gather. 3-D constants (rotary
    frequencies) and graph-computed operands are not weights."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != op_type:
            continue
        weight = dims.get(node.input[1] if op_type == "MatMul" else node.input[0], [])
        if len(weight) == 2 and weight[0] > 1:  # [1, N]: an outer product (the fused rotary's frequencies)
            found.append((node, weight[0] if op_type == "MatMul" else weight[1]))
    return found


def block_for(bits: int, k: int, options: PrecisionOptions) -> int:
    """Input features per quantization block of a ``bits``-bit weight with ``k`` input features."""
    return options.block_size if bits == 4 else eight_bit_block(k, options.block_size)


def eight_bit_block(k: int, block_size: int) -> int:
    """The block of an 8-bit weight with ``k`` input features: the largest power of two that divides
    ``k``, at most EIGHT_BIT_BLOCK and at least ``block_size``.

    At 8 bits the rounding step is 1/127 of a block's largest |weight|, so a scale per 32 weights
    (what 4 bits need) buys little and costs an eighth of the bytes: 256-wide blocks store 8.125 bits
    a weight instead of 9, and are still finer than the per-channel scales of usual int8 quantization.
    A divisor of ``k`` keeps a tied table's blocks (GatherBlockQuantized) free of padding.
    """
    return max(block_size, min(EIGHT_BIT_BLOCK, k & -k))


def quantize_weights(model: onnx.ModelProto, bits: int, options: PrecisionOptions, op_type: str,
                     skip: set[str] = frozenset(), only: set[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """MatMul weights -> MatMulNBits, or an embedding Gather -> GatherBlockQuantized (nodes by name:
    none in ``skip``, and only those in ``only`` if given), each at its block_for size."""
    for index, node in enumerate(model.graph.node):  # the quantizer selects and excludes nodes by name
        node.name = node.name or f"{node.op_type}_{index}"
    nodes = [(node, k) for node, k in weight_nodes(model, op_type) if node.name not in skip and (only is None or node.name in only)]
    chosen = {node.name: block_for(bits, k, options) for node, k in nodes if k >= options.block_size}
    report = {"quantized_weights": len(chosen), "float_weights": len(nodes) - len(chosen),
              "block_sizes": sorted(set(chosen.values()))}
    for block in sorted(set(chosen.values())):  # the quantizer takes one block size per pass
        names = {name for name, size in chosen.items() if size == block}
        at_block = replace(options, block_size=block)
        if op_type == "Gather":
            model = block_quantized_gathers(model, bits, at_block, names)
        else:
            model = quantized_matmuls(model, bits, at_block, names)
    return model, report


def quantized_matmuls(model: onnx.ModelProto, bits: int, options: PrecisionOptions, names: set[str]) -> onnx.ModelProto:
    """The MatMul nodes named in ``names`` -> MatMulNBits at ``options.block_size`` (MatMulNBitsQuantizer)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=options.block_size,
        is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level or None,
        bits=bits,
        op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    excluded = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in names]
    with quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, algo_config=config)
        quantizer.process()
    return quantizer.model.model


def block_quantized_gathers(model: onnx.ModelProto, bits: int, options: PrecisionOptions, names: set[str]) -> onnx.ModelProto:
    """Gather on a constant [vocab, hidden] table -> GatherBlockQuantized over uint8 data, quantized per
    row in blocks along hidden by onnxruntime's own block quantizer (the table quantized as the
    weight [hidden, vocab] of a MatMul: MatMulNBits' bytes, as a tied table shares them).

    Not MatMulNBitsQuantizer's own Gather path: it stores 4-bit tables as the INT4 tensor type,
    which the ORT format cannot hold, and has no 8-bit Gather."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric, bits=bits)
    quantizer = DefaultWeightOnlyQuantizer(config)
    inits = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(list(model.graph.node)):
        if node.name not in names:
            continue
        table = inits[node.input[0]]
        with quiet_quantizer():
            packed, scales, zero_points = quantizer.qbits_block_quant(numpy_helper.to_array(table).T.copy())
        new = block_quantized_gather(node, table.name, packed, scales, None if options.symmetric else zero_points, bits, options)
        model.graph.initializer.extend(new.initializers)
        model.graph.node.remove(node)
        model.graph.node.insert(index, new.node)
        model.graph.initializer.remove(table)
    if not any(opset.domain == MSFT for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT, 1))
    return model


@dataclass
class NewGather:
    node: onnx.NodeProto
    initializers: list[onnx.TensorProto]


def block_quantized_gather(node, name, packed, scales, zero_points, bits, options) -> NewGather:
    """A GatherBlockQuantized over MatMulNBits-layout arrays (packed [vocab, blocks, blob] uint8,
    scales [vocab, blocks], zero points packed per row), replacing ``node`` (a Gather on axis 0)."""
    vocab = packed.shape[0]
    initializers = [
        numpy_helper.from_array(packed.reshape(vocab, -1), f"{name}_Q{bits}"),
        numpy_helper.from_array(scales.reshape(vocab, -1), f"{name}_scales"),
    ]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points.reshape(vocab, -1), f"{name}_zero_points"))
    inputs = [initializers[0].name, node.input[1], initializers[1].name] + ([initializers[2].name] if zero_points is not None else [])
    new = helper.make_node(
        "GatherBlockQuantized", inputs, list(node.output), name=f"{node.name}_Q{bits}", domain=MSFT,
        gather_axis=0, quantize_axis=1, block_size=options.block_size, bits=bits,
    )
    return NewGather(new, initializers)


# ---- a tied table, stored once -------------------------------------------------------------------


def lm_head_node(decoder: onnx.ModelProto) -> onnx.NodeProto:
    """The node that computes ``logits`` (through Casts): the LM head's MatMul or MatMulNBits."""
    producers = {out: node for node in decoder.graph.node for out in node.output}
    node = producers[decoder.graph.output[0].name]
    while node.op_type == "Cast":
        node = producers[node.input[0]]
    if node.op_type not in ("MatMul", "MatMulNBits"):
        raise ValueError(f"decoder.onnx: logits come from a {node.op_type} node, not the LM head's MatMul")
    return node


def lm_head_weights(decoder: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The LM head's initializers: [W [hidden, vocab]] for a MatMul, [B, scales(, zero_points)] for a
    MatMulNBits."""
    inits = {init.name: init for init in decoder.graph.initializer}
    return [inits[name] for name in lm_head_node(decoder).input[1:] if name in inits]


def is_tied(embed_path: Path, decoder_path: Path) -> bool:
    """Whether the fp32 LM head's weight [hidden, vocab] is exactly the embedding table transposed.
    Both are compared where they lie in the graphs' data files (memory-mapped, not loaded: at the
    Qwen2-VL-2B shape loading decoder.onnx would take 6 GB)."""
    table = [init for init in onnx.load(str(embed_path), load_external_data=False).graph.initializer if len(init.dims) == 2]
    head = lm_head_weights(onnx.load(str(decoder_path), load_external_data=False))
    if len(table) != 1 or len(head) != 1 or list(head[0].dims) != list(table[0].dims)[::-1]:
        return False
    head_array = stored_array(head[0], decoder_path)
    table_array = stored_array(table[0], embed_path)
    rows = 4096  # compare a slab of vocabulary rows at a time: the transpose is a strided copy
    return all(np.array_equal(table_array[start : start + rows].T, head_array[:, start : start + rows])
               for start in range(0, table_array.shape[0], rows))


def stored_array(init: onnx.TensorProto, graph_path: Path) -> np.ndarray:
    """An initializer's values: a read-only memory map of its external data, or the inline array."""
    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    entries = {entry.key: entry.value for entry in init.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.memmap(graph_path.parent / entries["location"], dtype=dtype, mode="r",
                     offset=int(entries.get("offset", 0)), shape=tuple(init.dims))


def share_tied_table(embed_path: Path, decoder_path: Path, precision: str, options: PrecisionOptions, hidden: int) -> None:
    """Rewrite embed.onnx to read the LM head's tensors from decoder.onnx.data (see module docstring).

    The decoder must be final (converted and saved); ``hidden`` is the embedding width. At int4/int8
    the hidden size must be a whole number of blocks (MatMulNBits pads the last block otherwise).
    """
    head = lm_head_weights(onnx.load(str(decoder_path), load_external_data=False))
    shared = [external_view(init, decoder_path) for init in head]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden])
    if precision in BITS:
        vocab = head[0].dims[0]
        for view in shared:  # MatMulNBits' [vocab, blocks, blob] and flat scales/zero points, per row
            view.dims[:] = [vocab, int(np.prod(view.dims)) // vocab]
        inputs = [shared[0].name, "input_ids", *[view.name for view in shared[1:]]]
        head_node = lm_head_node(onnx.load(str(decoder_path), load_external_data=False))
        attrs = {a.name: helper.get_attribute_value(a) for a in head_node.attribute}
        nodes = [helper.make_node("GatherBlockQuantized", inputs, ["inputs_embeds"], domain=MSFT, gather_axis=0,
                                  quantize_axis=1, block_size=attrs["block_size"], bits=attrs["bits"])]
    else:
        rows = "rows" if precision == "fp16" else "inputs_embeds"
        nodes = [helper.make_node("Gather", [shared[0].name, "input_ids"], ["columns"], axis=1),
                 helper.make_node("Transpose", ["columns"], [rows], perm=[1, 2, 0])]
        if precision == "fp16":
            nodes.append(helper.make_node("Cast", ["rows"], ["inputs_embeds"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "embed", [ids], [out], shared)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(MSFT, 1)] if precision in BITS else [])
    for stale in (embed_path, embed_path.with_name(embed_path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(embed_path))


def head_bits(precision: str, options: PrecisionOptions) -> int:
    """The LM head's bits in a bundle at ``precision`` (int4 or int8)."""
    return (options.lm_head_bits or 4) if precision == "int4" else BITS[precision]


def can_share(precision: str, options: PrecisionOptions, hidden: int) -> bool:
    """Whether a tied table of width ``hidden`` can read the quantized head's blocks without padding."""
    return precision not in BITS or hidden % block_for(head_bits(precision, options), hidden, options) == 0


def external_view(init: onnx.TensorProto, graph_path: Path) -> onnx.TensorProto:
    """A tensor proto with ``init``'s name, type and dims whose data is where ``init``'s lies, as a
    path relative to the bundle (other graphs of the bundle read the same bytes)."""
    view = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims, data_location=TensorProto.EXTERNAL)
    if init.data_location != TensorProto.EXTERNAL:
        raise ValueError(f"{graph_path.name}: {init.name} is not stored as external data")
    view.external_data.extend(init.external_data)
    return view


# ---- files -------------------------------------------------------------------------------------


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Overwrite ``path`` and its ``.data`` file (every tensor over 1 KB outside the protobuf, so any
    graph loads past protobuf's 2 GB limit)."""
    scratch = path.with_name(path.name + ".tmp")
    scratch_data = path.with_name(scratch.name + ".data")
    onnx.save_model(model, str(scratch), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=scratch_data.name, size_threshold=1024)
    move_graph(scratch, path)  # the data file keeps its usual name


def move_graph(source: Path, target: Path, rename_data: bool = True) -> None:
    """Move graph ``source`` and its data file ``source.data`` to ``target`` and ``target.data``. With
    ``rename_data`` the protobuf is rewritten to name the new data file; without, it keeps naming the
    old one (a graph moved aside and back)."""
    data = f"{target.name}.data"
    if rename_data:
        saved = onnx.load(str(source), load_external_data=False)
        for init in saved.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = data
        onnx.save_model(saved, str(source))
    os.replace(source.with_name(f"{source.name}.data"), target.with_name(data))
    os.replace(source, target)


class quiet_quantizer:
    """onnxruntime.quantization logs a line per node at INFO; keep it to errors."""

    def __enter__(self):
        self.errors = np.seterr(divide="ignore", invalid="ignore")  # all-zero blocks (e.g. a padding row)
        self.logger = logging.getLogger("onnxruntime.quantization")
        self.level = self.logger.level
        self.root = logging.getLogger().level
        self.logger.setLevel(logging.ERROR)
        logging.getLogger().setLevel(max(self.root, logging.WARNING))

    def __exit__(self, *exc):
        np.seterr(**self.errors)
        self.logger.setLevel(self.level)
        logging.getLogger().setLevel(self.root)
