"""LLaMA-Adapter (Zhang et al. 2023): learnable adaption prompts with zero-initialised, gated
attention in the top layers of the LLM.

In an adapted layer with K prompt tokens P (K x hidden), each query attends to the prompts with a
softmax of its own, scaled by a per-head gate g initialised to zero, and the result is added to the
layer's ordinary attention output:

    out = attn(x) + o_proj( g * softmax(q k_P^T / sqrt(d)) v_P ),   k_P = k_proj(P), v_P = v_proj(P)

q carries its rotary position as in the ordinary attention; the prompts carry none. With g = 0
the layer is exactly the frozen one at step 0, and knowledge flows in only as the gates open.

``visual_prompt: true`` is the paper's multimodal variant: the image's global feature (the mean of
its image embeddings: the connector's output times the family's connector_output_scale), through a
learned projection initialised to zero, is added to every prompt token, so the prompts carry the
image. It needs one image per sample.

peft's AdaptionPrompt does this for a few text model types (llama, mistral, gpt2) keyed on the top
config's model_type, which a VLM never matches; this is the general version for any attention
module that has q/k/v/o projections and its modeling file's ``apply_rotary_pos_emb``. The prompts
are nonlinear in the output, so the method is traced into decoder.onnx rather than merged.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from edgetune.errors import UserError
from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.methods.modules import MethodModule, OwnMethod, attach_module, chosen_layers, decoder_layers, hidden_states_arg
from edgetune.recipe import MethodSection

CHILD = "adaption_prompt"
VISUAL_CHILD = "adaption_prompt_visual"
UNADAPTED_BOTTOM_LAYERS = 2  # the paper adapts the top 30 of LLaMA-7B's 32 layers


def rotary_function(attention: torch.nn.Module) -> Any:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` from the attention's own modeling file, so the
    prompts' queries rotate exactly as the layer's do."""
    rotate = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotate is None:
        raise UserError(f"method 'llama_adapter': {type(attention).__name__} has no apply_rotary_pos_emb; choose another method")
    return rotate


class GlobalImageFeature(MethodModule):
    """On the connector: remembers each image's mean embedding for the adaption prompts of the
    forward pass (and, in generate, of the decode steps that follow without pixels)."""

    decoder_input = "image_feature"

    def __init__(self, hidden_size: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale  # connector output -> image embeddings (PaliGemma: 1 / sqrt(hidden))
        self.proj = torch.nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)
        self.feature: torch.Tensor | None = None  # [images, hidden]

    def after(self, connector, args, kwargs, output):
        self.feature = output.mean(dim=1) * self.scale
        return None

    def prompt_offset(self, batch: int) -> torch.Tensor:
        """[batch, 1, hidden]: the projected global feature, one per sample."""
        if self.feature is None or self.feature.shape[0] != batch:
            images = None if self.feature is None else self.feature.shape[0]
            raise UserError(f"method.visual_prompt needs exactly one image per sample; got {images} image(s) for {batch} sample(s)")
        return self.proj(self.feature.to(self.proj.weight.dtype))[:, None]


class AdaptionPrompt(MethodModule):
    def __init__(self, attention: torch.nn.Module, prompt_len: int, hidden_size: int, num_heads: int,
                 visual: GlobalImageFeature | None = None):
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.randn(prompt_len, hidden_size))  # N(0, 1) as in the paper's code
        self.gate = torch.nn.Parameter(torch.zeros(num_heads))
        self.rotate = rotary_function(attention)
        self.__dict__["visual"] = visual  # shared by every layer, owned by the connector: not a child here

    def after(self, attn, args, kwargs, output):
        hidden = hidden_states_arg(args, kwargs)
        batch, seq, _ = hidden.shape
        head_dim = attn.head_dim
        query = attn.q_proj(hidden).view(batch, seq, -1, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        query = self.rotate(query, query, cos, sin)[0]
        prompt = self.prompt[None]  # [1 or batch, K, hidden]
        if self.visual is not None:
            prompt = prompt + self.visual.prompt_offset(batch)
        prompt = prompt.to(hidden.dtype)
        rows, length = prompt.shape[:2]
        keys = attn.k_proj(prompt).view(rows, length, -1, head_dim).transpose(1, 2)  # [rows, kv_heads, K, head_dim]
        values = attn.v_proj(prompt).view(rows, length, -1, head_dim).transpose(1, 2)
        groups = query.shape[1] // keys.shape[1]  # grouped-query attention: kv heads are shared
        keys = keys.repeat_interleave(groups, dim=1)  # [rows, heads, K, head_dim]
        values = values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, keys.transpose(-1, -2)) * attn.scaling  # [batch, heads, seq, K]
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        gated = torch.matmul(weights, values) * self.gate.to(values.dtype)[:, None, None]
        extra = attn.o_proj(gated.transpose(1, 2).reshape(batch, seq, -1))
        if getattr(attn.o_proj, "bias", None) is not None:
            extra = extra - attn.o_proj.bias  # o_proj is linear: add only its weight's share
        return (output[0] + extra.to(output[0].dtype), *output[1:])


class LlamaAdapterMethod(OwnMethod):
    name = "llama_adapter"
    options = frozenset({"prompt_len", "layers", "visual_prompt"})
    export_as = "graph"

    def check_family(self, family: ModelFamily, config: MethodSection) -> None:
        if family.rope != "1d":
            raise UserError(
                f"method 'llama_adapter' does not support '{family.name}' models yet: their {family.rope} rotary "
                "positions are not implemented for the adaption prompts; choose another method"
            )
        if config.visual_prompt and not family.connector_row_per_image:
            raise UserError(
                f"method.visual_prompt: '{family.name}' models pass each image through the connector as several "
                "crops or tiles, and the visual prompt needs one global feature per image; set visual_prompt: false"
            )

    def add_modules(self, model: Any, family: ModelFamily, config: MethodSection) -> None:
        text = family.text_config(model.config)
        layers = decoder_layers(model, family)
        count = len(layers)
        top = list(range(UNADAPTED_BOTTOM_LAYERS, count)) if count > UNADAPTED_BOTTOM_LAYERS else list(range(count))
        device = next(layers.parameters()).device
        visual = None
        if config.visual_prompt:
            feature = GlobalImageFeature(text.hidden_size, family.connector_output_scale(model.config))
            visual = attach_module(get_module(model, family.connector), VISUAL_CHILD, feature.to(device))
        for i in chosen_layers(model, family, config, default=top):
            attention = get_module(layers[i], family.attention)
            module = AdaptionPrompt(attention, config.prompt_len, text.hidden_size, text.num_attention_heads, visual)
            attach_module(attention, CHILD, module.to(device))
