"""Prefix tuning (Li & Liang 2021): ``prompt_len`` learned keys and values per layer, which every
token attends to as if they were cached tokens in front of the sequence.

The prefix joins each attention layer from the inside: a pre-hook hands the layer a cache view
whose ``update`` returns [prefix ; cached ; new] keys/values and widens the attention mask by
``prompt_len`` always-visible columns. Going in through the model's ``past_key_values`` instead
(as peft does) breaks under gradient checkpointing, which drops the cache inside checkpointed
layers (transformers 4.57's GradientCheckpointingLayer). Real tokens keep positions 0, 1, ...:
the prefix has no position.

On the device the prefix is a constant: the bundle stores it (kv_prefix.safetensors) and the
runtime puts it in the KV cache before the first token, with the mask widened the same way and
positions counted over real tokens only. Every layer gets a prefix (no ``layers`` option): the
decoder's one attention mask covers every layer's cache, so all caches must be equally long.

Initialisation: keys are the layer's k_proj of random vocabulary embeddings (in distribution, so
attention to them is neither negligible nor dominant), values are zero. Step 0 is therefore not
the frozen model: every token gives the prefix some attention mass, which scales the rest down.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.families import ModelFamily
from edgetune.families.base import get_module
from edgetune.methods.modules import MethodModule, OwnMethod, attach_module, decoder_layers, hidden_states_arg
from edgetune.recipe import MethodSection

CHILD = "kv_prefix"


class PrefixedCache:
    """What the attention layer sees as ``past_key_values``: the real cache (or none, as in
    training) with the layer's prefix in front of whatever it returns."""

    def __init__(self, prefix: "KVPrefix", inner: Any):
        self.prefix, self.inner = prefix, inner

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if self.inner is not None:
            key, value = self.inner.update(key, value, layer_idx, cache_kwargs)
        batch = key.shape[0]
        prefix_key = self.prefix.key.to(key.dtype).expand(batch, -1, -1, -1)
        prefix_value = self.prefix.value.to(value.dtype).expand(batch, -1, -1, -1)
        return torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)


class KVPrefix(MethodModule):
    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key = torch.nn.Parameter(key[None])  # [1, kv_heads, prompt_len, head_dim]
        self.value = torch.nn.Parameter(value[None])

    def before(self, attn, args, kwargs):
        hidden = hidden_states_arg(args, kwargs)
        seq = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        eager = getattr(attn.config, "_attn_implementation", "sdpa") == "eager"
        kwargs = dict(kwargs, past_key_values=PrefixedCache(self, cache),
                      attention_mask=self.widened_mask(mask, seq, past, hidden, eager))
        return args, kwargs

    def widened_mask(self, mask, seq: int, past: int, hidden: torch.Tensor, eager: bool) -> torch.Tensor:
        """The layer's 4-D mask with prompt_len visible columns in front. A missing mask (causal,
        no padding) is made explicit first: sdpa's is_causal shortcut would align the causal
        triangle to the prefix instead of to the last key."""
        length = self.key.shape[2]
        if mask is None:
            rows = torch.arange(seq, device=hidden.device)[:, None] + past
            allowed = torch.arange(past + seq, device=hidden.device)[None, :] <= rows
            mask = allowed[None, None]
            if eager:
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~allowed, torch.finfo(hidden.dtype).min)
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros
        front = visible((*mask.shape[:-1], length), dtype=mask.dtype, device=mask.device)
        return torch.cat([front, mask], dim=-1)


class PrefixTuningMethod(OwnMethod):
    name = "prefix"
    options = frozenset({"prompt_len"})
    export_as = "kv_prefix"
    identity_at_init = False

    def add_modules(self, model: Any, family: ModelFamily, config: MethodSection) -> None:
        embed = model.get_input_embeddings()
        with torch.no_grad():
            tokens = embed(torch.randint(0, embed.num_embeddings, (config.prompt_len,), device=embed.weight.device)).float()
            tokens = tokens / tokens.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # as after RMSNorm
            inputs = tokens.to(embed.weight.dtype)  # the compute dtype
            for layer in decoder_layers(model, family):
                attention = get_module(layer, family.attention)
                key = attention.k_proj(inputs).float().view(config.prompt_len, -1, attention.head_dim).transpose(0, 1)
                value = torch.zeros_like(key)  # step 0 adds nothing, it only shares attention mass
                attach_module(attention, CHILD, KVPrefix(key.contiguous(), value))

    def kv_prefix(self, model: Any, family: ModelFamily) -> list[tuple[torch.Tensor, torch.Tensor]]:
        prefixes = []
        for layer in decoder_layers(model, family):
            module = getattr(get_module(layer, family.attention), CHILD)
            prefixes.append((module.key[0].detach(), module.value[0].detach()))
        return prefixes
