"""The three torch modules a bundle's ONNX graphs are traced from, and the one export call.

A vision-language model ships as three graphs, so that the runtime runs the vision tower once per
image and the decoder once per generated token:

    vision.onnx   the family's pixel inputs                -> image_embeds [..., hidden]
                  (default: pixel_values [batch, 3, H, W] -> [batch, image_tokens, hidden];
                  a family's vision_graph hook may take other inputs, e.g. one image's patches)
    embed.onnx    input_ids [batch, seq] (int64)       -> inputs_embeds [batch, seq, hidden]
    decoder.onnx  inputs_embeds [batch, seq, hidden], attention_mask [batch, past + seq] (int64),
                  position_ids [batch, seq] (int64; [3, batch, seq] for M-RoPE), the family's
                  decoder_extras, past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim]
                  -> logits [batch, seq, vocab],
                     present.{i}.key/.value [batch, kv_heads, past + seq, head_dim]

The decoder never sees pixels: the runtime writes image_embeds into the rows of inputs_embeds that
hold image tokens, as the families' own forward does. A method module that needs a per-image
tensor on every step (LLaMA-Adapter's visual prompt) adds one decoder input after position_ids,
``image_feature`` [batch, hidden]: the mean of the image's image_embeds, which the runtime
computes. Every module is built from the family interface (vision_graph, the language model and
lm_head paths, get_input_embeddings), so a new family exports through the same code.

Exporter notes (torch 2.13, transformers 4.57): only the dynamo exporter handles transformers'
mask and cache code; the decoder is traced with past > 0 (past = 0 would specialise the dim to a
constant) and declared with ``Dim("past", min=0)``, and the graph runs with past = 0 (an empty KV
cache, the prefill step). The mask length is its own dim ("total") because torch.export cannot
express "past + seq" as an input dim; the runtime always feeds total = past + seq.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim
from transformers import DynamicCache

from edgetune.families.base import ModelFamily, get_module
from edgetune.families.export_spec import GraphSpec
from edgetune.progress import debug_enabled

OPSET = 18


class EmbedGraph(torch.nn.Module):
    """input_ids -> the LLM's token embeddings (image tokens get a row too; the runtime overwrites it)."""

    def __init__(self, model: Any):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderGraph(torch.nn.Module):
    """One decoder step over inputs_embeds with an explicit KV cache in and out.

    past is a flat list [key_0, value_0, key_1, value_1, ...]; it may be empty along the past
    dim. The cache is rebuilt as a DynamicCache so the LLM runs its own attention code unchanged.
    """

    def __init__(self, family: ModelFamily, model: Any):
        super().__init__()
        self.family = family
        self.language_model = get_module(model, family.language_model)
        self.lm_head = get_module(model, family.lm_head)
        self.fed = fed_modules(model)

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest: torch.Tensor):
        extras = dict(zip(self.family.decoder_extras, rest))
        rest = rest[len(extras) :]
        features, past = rest[: len(self.fed)], rest[len(self.fed) :]
        for module, feature in zip(self.fed, features):
            module.feature = feature
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        past_length = past[0].shape[2]
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **self.family.language_model_kwargs(attention_mask, past_length, extras),
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(out.last_hidden_state), *present)


def fed_modules(model: Any) -> list[Any]:
    """The method modules that take a decoder input of their own (see the module docstring)."""
    from edgetune.methods.modules import MethodModule

    return [m for m in model.modules() if isinstance(m, MethodModule) and m.decoder_input]


@dataclass
class TextDims:
    """The decoder's shape facts the runtime needs to build an empty KV cache."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def text_dims(family: ModelFamily, model: Any) -> TextDims:
    text = family.text_config(model.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return TextDims(
        hidden_size=text.hidden_size,
        num_layers=family.num_layers(model.config),
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=get_module(model, family.lm_head).out_features,
    )


def graph_specs(family: ModelFamily, model: Any, processor: Any) -> list[GraphSpec]:
    """The three graphs with sample inputs. Samples use batch 2, seq 3 and past 4 so that no dynamic
    dim is traced at 0 or 1, which torch.export would specialise to a constant."""
    dims = text_dims(family, model)
    batch, past, seq, total = Dim("batch"), Dim("past", min=0), Dim("seq"), Dim("total")
    kv_shape = (2, dims.num_kv_heads, 4, dims.head_dim)
    kv_names = [f"{i}.{kind}" for i in range(dims.num_layers) for kind in ("key", "value")]
    fed = [m.decoder_input for m in fed_modules(model)]
    extras = family.decoder_extra_inputs(batch, seq, total)
    if list(extras) != list(family.decoder_extras):
        raise ValueError(f"{family.name}: decoder_extra_inputs {list(extras)} != decoder_extras {family.decoder_extras}")
    if family.rope == "mrope":
        position_sample, position_dims = torch.arange(4, 7).repeat(3, 2, 1), {1: batch, 2: seq}
    else:
        position_sample, position_dims = torch.arange(4, 7).repeat(2, 1), {0: batch, 1: seq}
    return [
        family.vision_graph(model, processor),
        GraphSpec(
            name="embed",
            module=EmbedGraph(model),
            sample_args=(torch.randint(0, dims.vocab_size, (2, 3)),),
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_shapes=({0: batch, 1: seq},),
        ),
        GraphSpec(
            name="decoder",
            module=DecoderGraph(family, model),
            sample_args=(
                torch.randn(2, 3, dims.hidden_size),
                torch.ones(2, 7, dtype=torch.int64),
                position_sample,
                *[sample for sample, _ in extras.values()],
                *[torch.randn(2, dims.hidden_size) for _ in fed],
                *[torch.randn(kv_shape) for _ in kv_names],
            ),
            input_names=["inputs_embeds", "attention_mask", "position_ids", *extras, *fed]
            + [f"past_key_values.{n}" for n in kv_names],
            output_names=["logits"] + [f"present.{n}" for n in kv_names],
            dynamic_shapes=(
                {0: batch, 1: seq},
                {0: batch, 1: total},
                position_dims,
                # one entry for *rest
                tuple([d for _, d in extras.values()] + [{0: batch} for _ in fed] + [{0: batch, 2: past} for _ in kv_names]),
            ),
        ),
    ]


def export_graph(spec: GraphSpec, out_dir: Path) -> Path:
    """Trace ``spec`` with the dynamo exporter into out_dir/{name}.onnx (+ external weights)."""
    path = out_dir / f"{spec.name}.onnx"
    with quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                spec.module.eval(),
                spec.sample_args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=spec.dynamic_shapes,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        except Exception as err:
            raise RuntimeError(
                f"torch.onnx.export failed for {spec.name}.onnx: {err}\n"
                "(set EDGETUNE_DEBUG=1 to see the exporter's log)"
            ) from err
    return path


def describe_graph(path: Path) -> dict:
    """The manifest entry for one exported graph, read back from the ONNX file itself."""
    model = onnx.load(str(path), load_external_data=False)

    def values(infos) -> list[dict]:
        return [
            {
                "name": info.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim],
            }
            for info in infos
        ]

    data_files = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return {
        "file": path.name,
        "data_files": sorted(data_files),
        "inputs": values(model.graph.input),
        "outputs": values(model.graph.output),
    }


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx's warnings, log lines and prints off the terminal unless EDGETUNE_DEBUG is set.

    The exporter reports every op it translates and warns about optional packages (torchvision)
    it does not need; none of it is actionable for a user, and failures still raise.
    """
    if debug_enabled():
        yield
        return
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
