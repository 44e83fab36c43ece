"""Qwen2-VL and Qwen2.5-VL: a ViT over dynamic-resolution patches, whose merger (the connector)
joins each 2x2 block of patches into one LLM token, and a Qwen2 LLM with 3-D multimodal RoPE.

An image keeps (about) its own aspect ratio and size: the image processor resizes it to multiples
of patch_size * merge_size within [min_pixels, max_pixels] and flattens it into patches
[t*h*w, 3 * temporal_patch * patch * patch] with ``image_grid_thw`` = (t, h, w) per image, so the
number of image tokens, t*h*w / merge**2, differs from image to image. Positions are 3-D
(temporal, height, width; ``get_rope_index``): text tokens advance all three together, image tokens
take their grid coordinates, so the LLM takes position_ids [3, batch, seq].

The two versions differ in the vision tower only (Qwen2.5-VL: RMSNorm, gated MLP, windowed
attention in all blocks but ``fullatt_block_indexes``); the LLM, the processor's prompt expansion
and the chat format are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families.base import ModelFamily, get_module, images_only_processor_class

# The Qwen2-VL / Qwen2.5-VL Instruct checkpoints' chat template (ChatML; a default system turn;
# each image is "<|vision_start|><|image_pad|><|vision_end|>", the processor expands the pad).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The checkpoints' special tokens, in their vocabulary order (ids 151643-151656).
QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5's tokenizer adds these as ordinary (non-special) added tokens after the special ones.
QWEN2_5_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# Tiny models: patches of 8 pixels merged 2x2, so a 48x48 image is a 6x6 patch grid = 9 tokens.
TINY_PATCH, TINY_MERGE = 8, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 32 * 32, 64 * 64


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    processor_class_name = "Qwen2VLProcessor"
    vision_tower = "model.visual"
    connector = "model.visual.merger"  # inside the vision tower: ln_q, then mlp = Linear, GELU, Linear
    language_model = "model.language_model"
    layers = "model.language_model.layers"
    connector_output = "model.visual.merger.mlp.2"
    rope = "mrope"
    windowed = False  # Qwen2.5-VL: windowed attention in the vision tower
    tie_word_embeddings = True  # Qwen2-VL-2B ties them; the 7B and 72B do not

    processor_knobs = {
        "max_pixels": "most pixels an image is resized to (image tokens = pixels / (patch * merge)**2): the main memory knob",
        "min_pixels": "fewest pixels an image is resized to",
    }

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    # ---- load ---------------------------------------------------------------------------------

    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """The checkpoint's processor without its video processor.

        transformers' Qwen2-VL processors require a video processor, and every video processor
        requires torchvision, which has no CPU build to pair with a CPU torch. edgetune handles
        images only, so it assembles the processor from the image processor (the slow one: the
        runtime's reference), the tokenizer and the chat template; prompts, placeholder expansion
        and image tensors are the real processor class's own code.
        """
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        image_processor = Qwen2VLImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor_class = images_only_processor_class(self.processor_class_name)
        # The processor's own template file (chat_template.jinja, or the older chat_template.json) first.
        chat_template = processor_class.get_processor_dict(path)[0].get("chat_template") or tokenizer.chat_template
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    def configure_processor(self, processor: Any, knobs: dict[str, Any]) -> None:
        """min_pixels / max_pixels, kept in ``size`` too, which is what save_pretrained writes."""
        from edgetune.errors import UserError

        ip = processor.image_processor
        for knob, value in knobs.items():
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model.processor.{knob}: expected a positive whole number of pixels, got {value!r}")
            setattr(ip, knob, value)
        if ip.min_pixels > ip.max_pixels:
            raise UserError(f"model.processor: min_pixels {ip.min_pixels} exceeds max_pixels {ip.max_pixels}")
        ip.size = {"shortest_edge": ip.min_pixels, "longest_edge": ip.max_pixels}

    def image_problem(self, processor: Any, width: int, height: int) -> str | None:
        """transformers' own smart_resize at the processor's settings: in 4.57 it refuses an aspect
        ratio above 200 (an image smaller than patch x merge is scaled up to min_pixels, not refused)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if problem := super().image_problem(processor, width, height):
            return problem
        ip = processor.image_processor
        try:
            smart_resize(height, width, ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"])
        except ValueError as err:
            return f"the {self.name} image processor refuses it ({err}); crop or pad it to a less elongated shape"
        return None

    # ---- images and export --------------------------------------------------------------------

    def image_embeds(self, model: Any, inputs: Any) -> Any:
        """The merger's output for every image of ``inputs``, one image after the other."""
        import torch

        return torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))

    def image_cache_call(self, model: Any) -> Any:
        """The tower ends in the connector (visual.merger): the cache holds the merger's input and
        stands in for the whole of ``visual``, keeping the merger, which still runs and trains."""
        from edgetune.image_cache import MergerInputCall

        return MergerInputCall(self.vision_tower, merger=self.connector.removeprefix(self.vision_tower + "."), windowed=self.windowed)

    def position_ids(self, model: Any, inputs: Any) -> Any:
        return None  # the model's own get_rope_index, as generate uses it

    def vision_graph(self, model: Any, processor: Any) -> Any:
        """One image's patches (+ the codec's index arrays) -> its tokens [t*h*w / merge**2, hidden]."""
        import torch
        from torch.export import Dim

        from edgetune.families.export_spec import GraphSpec
        from edgetune.runtime.codecs.qwen2_vl import rotary_position_ids, window_layout

        visual = get_module(model, self.vision_tower)
        config = visual.config
        grid = (1, 6, 8)  # a sample image of 6 x 8 patches: 12 tokens, 2 x 2 windows of Qwen2.5-VL's tiny size
        merge = config.spatial_merge_size
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        tokens = Dim("tokens")
        patches = merge * merge * tokens
        sample = [torch.randn(grid[1] * grid[2], patch_dim), torch.from_numpy(rotary_position_ids(grid, merge))]
        names, dims = ["pixel_values", "rotary_position_ids"], [{0: patches}, {0: patches}]
        if self.windowed:
            window_index, window_segments = window_layout(grid, merge, config.patch_size, config.window_size)
            sample += [torch.from_numpy(window_index), torch.from_numpy(window_segments)]
            names += ["window_index", "window_segments"]
            dims += [{0: tokens}, {0: patches}]
        return GraphSpec(
            name="vision",
            module=one_image_vision(visual, self.windowed),
            sample_args=tuple(sample),
            input_names=names,
            output_names=["image_embeds"],
            dynamic_shapes=tuple(dims),
        )

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """Codec "qwen2_vl": the image processor's parameters, the vision start token that
        get_rope_index looks for, and (Qwen2.5-VL) the window size in pixels."""
        from PIL import Image

        from edgetune.families.export_spec import prompt_section

        ip = processor.image_processor
        config = get_module(model, self.vision_tower).config
        image = {
            "codec": "qwen2_vl",
            "token": processor.image_token,
            "token_id": self.image_token_id(model.config),
            "vision_start_token_id": model.config.vision_start_token_id,
            "window_size": config.window_size if self.windowed else None,
            "preprocess": {
                "convert_rgb": bool(ip.do_convert_rgb),
                "resize": bool(ip.do_resize),
                "min_pixels": ip.min_pixels,
                "max_pixels": ip.max_pixels,
                "resample": Image.Resampling(ip.resample).name.lower(),
                "rescale_factor": ip.rescale_factor if ip.do_rescale else None,
                "mean": list(ip.image_mean) if ip.do_normalize else None,
                "std": list(ip.image_std) if ip.do_normalize else None,
                "patch_size": ip.patch_size,
                "temporal_patch_size": ip.temporal_patch_size,
                "merge_size": ip.merge_size,
            },
        }
        return image, prompt_section(processor, processor.image_token, model_dir)

    # ---- tiny models ----------------------------------------------------------------------------

    def tiny_vision_config(self) -> Any:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

        return Qwen2VLVisionConfig(
            depth=2,
            embed_dim=32,
            hidden_size=64,  # the merger's output: the LLM's hidden size
            mlp_ratio=2,
            num_heads=2,
            patch_size=TINY_PATCH,
            spatial_merge_size=TINY_MERGE,
            temporal_patch_size=2,
        )

    def tiny_added_tokens(self) -> list[str]:
        return []

    def build_tiny(self, out_dir: Path) -> None:
        import torch
        import transformers
        from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor

        from edgetune.families.tiny import TINY_TEXT, train_byte_level_bpe

        tokenizer = Qwen2TokenizerFast(
            tokenizer_object=train_byte_level_bpe(QWEN_VL_SPECIAL_TOKENS),
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            errors="replace",
            add_prefix_space=False,
        )
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIAL_TOKENS[1:]})
        tokenizer.add_tokens(self.tiny_added_tokens())
        tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
        image_processor = Qwen2VLImageProcessor(
            min_pixels=TINY_MIN_PIXELS,
            max_pixels=TINY_MAX_PIXELS,
            patch_size=TINY_PATCH,
            temporal_patch_size=2,
            merge_size=TINY_MERGE,
        )
        ids = tokenizer.convert_tokens_to_ids
        config_class = getattr(transformers, self.model_class_name.replace("ForConditionalGeneration", "Config"))
        config = config_class(
            vision_config=self.tiny_vision_config().to_dict(),
            text_config=dict(
                **TINY_TEXT,
                vocab_size=len(tokenizer),
                rope_theta=1000000.0,
                # temporal, height, width shares of the rotary half-dim: 8 of head_dim 16 (the checkpoints: 16, 24, 24 of 64)
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=ids("<|endoftext|>"),
                eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"),
                tie_word_embeddings=self.tie_word_embeddings,
            ),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=self.tie_word_embeddings,
        )
        torch.manual_seed(0)
        model = self.model_class()(config)
        model.generation_config.bos_token_id = ids("<|endoftext|>")
        model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
        model.generation_config.pad_token_id = ids("<|endoftext|>")
        model.save_pretrained(out_dir, safe_serialization=True)
        # What the real processor's save_pretrained writes: the parts, tagged with its class name.
        for part in (tokenizer, image_processor):
            part._set_processor_class(self.processor_class_name)
            part.save_pretrained(out_dir)
        (Path(out_dir) / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)


class Qwen2_5_VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name = "Qwen2_5_VLProcessor"
    windowed = True
    tie_word_embeddings = True  # Qwen2.5-VL-3B ties them; the 7B, 32B and 72B do not

    def tiny_vision_config(self) -> Any:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        return Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,  # the LLM's hidden size
            patch_size=TINY_PATCH,
            spatial_merge_size=TINY_MERGE,
            temporal_patch_size=2,
            tokens_per_second=2,
            # windows of 32 pixels = 2x2 merged tokens, so a 48x48 image has 4 windows (4, 2, 2, 1 tokens)
            window_size=32,
            fullatt_block_indexes=[1],
        )

    def tiny_added_tokens(self) -> list[str]:
        return QWEN2_5_ADDED_TOKENS


def one_image_vision(visual: Any, windowed: bool) -> Any:
    """The vision tower + merger as a torch module for one image, built on call so that this file
    imports without torch (the runtime imports the family registry).

    The tower's own forward derives rotary ids, windows and cu_seqlens from grid_thw values and
    splits attention per window with ``.tolist()``: data-dependent shapes no exported graph can
    hold. Here the codec's numpy arrays come in instead (rotary_position_ids; Qwen2.5-VL:
    window_index, window_segments), and each window is an attention mask over the image's patches,
    so the blocks run on their own weights with one scaled_dot_product_attention each.
    """
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    def attention(attn: Any, hidden: Any, position_embeddings: tuple, mask: Any) -> Any:
        seq = hidden.shape[0]
        query, key, value = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out.transpose(1, 2).reshape(seq, -1))

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, rotary_position_ids, window_index=None, window_segments=None):
            unit = visual.spatial_merge_size**2
            hidden = visual.patch_embed(pixel_values)
            freqs = (rotary_position_ids[..., None].float() * visual.rotary_pos_emb.inv_freq).flatten(1)
            windows = None
            if windowed:  # patches regrouped window by window, as Qwen2.5-VL's forward does
                hidden = hidden.reshape(-1, unit, hidden.shape[-1])[window_index].reshape(hidden.shape)
                freqs = freqs.reshape(-1, unit, freqs.shape[-1])[window_index].reshape(freqs.shape)
                windows = window_segments[:, None] == window_segments[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            position_embeddings = (emb.cos(), emb.sin())
            for i, block in enumerate(visual.blocks):
                full = not windowed or i in visual.fullatt_block_indexes  # one image: no mask at all
                hidden = hidden + attention(block.attn, block.norm1(hidden), position_embeddings, None if full else windows)
                hidden = hidden + block.mlp(block.norm2(hidden))
            tokens = visual.merger(hidden)
            return tokens[torch.argsort(window_index)] if windowed else tokens

    return Module()
