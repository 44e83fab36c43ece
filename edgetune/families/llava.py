"""LLaVA-1.5 style models: CLIP/SigLIP vision tower -> MLP projector -> Llama-style LLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families.base import ModelFamily

# LLaVA-1.5's conversation format, as llava-hf's processors render it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}<image>\n{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaFamily(ModelFamily):
    name = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    vision_tower = "model.vision_tower"
    connector = "model.multi_modal_projector"
    language_model = "model.language_model"
    layers = "model.language_model.layers"
    connector_output = "model.multi_modal_projector.linear_2"

    # Longest side / shortest side edgetune accepts for CLIP-style preprocessing (below).
    max_aspect_ratio = 200

    def image_problem(self, processor: Any, width: int, height: int) -> str | None:
        """CLIP's preprocessing resizes the shortest side to size.shortest_edge keeping the aspect ratio,
        then center-crops: a 2x4000 image becomes 336 x 672,000 pixels first (13 s and 2.5 GB in
        transformers 4.57 on one core) of which the crop keeps 0.05%. Nothing refuses it, so edgetune
        draws the line at Qwen2-VL's own limit, an aspect ratio of 200 (0.7 s, 0.2 GB at 336 px)."""
        if problem := super().image_problem(processor, width, height):
            return problem
        ip = processor.image_processor
        aspect = max(width, height) / min(width, height)
        if "shortest_edge" in ip.size and ip.do_center_crop and aspect > self.max_aspect_ratio:
            short = ip.size["shortest_edge"]
            return (
                f"aspect ratio {aspect:.0f}:1 is above {self.max_aspect_ratio}:1: the processor would resize it to "
                f"{short}x{round(short * aspect):,} pixels and keep the middle {ip.crop_size['height']} of them; "
                "crop or pad it to a less elongated shape"
            )
        return None

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """LlavaModel.get_image_features, returned as one tensor instead of a per-image list
        (transformers 4.57 unbinds the batch, which would fix the batch size in an ONNX trace)."""
        import torch

        from edgetune.families.base import get_module

        config = model.config
        hidden_states = get_module(model, self.vision_tower)(pixel_values, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        selected = [hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]  # drop CLIP's CLS token
        return get_module(model, self.connector)(torch.cat(selected, dim=-1))

    def image_cache_call(self, model: Any) -> Any:
        """The model reads only the hidden states of config.vision_feature_layer (one layer or a list)
        from the tower's output_hidden_states=True call: those are cached, not every layer's."""
        from edgetune.image_cache import RowwiseCall

        layers = model.config.vision_feature_layer
        count = model.config.vision_config.num_hidden_layers + 1  # the embeddings, then every layer
        chosen = sorted({i % count for i in ([layers] if isinstance(layers, int) else layers)})
        return RowwiseCall(self.vision_tower, fields=tuple(f"hidden_states.{i}" for i in chosen), hidden_states_count=count)

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """CLIP preprocessing (shortest-edge resize, center crop, fixed size); one "<image>"
        placeholder expanded to one image token per image embedding (runtime codec "clip")."""
        import torch
        from PIL import Image

        from edgetune.errors import UserError
        from edgetune.families.export_spec import prompt_section

        ip = processor.image_processor
        if "shortest_edge" not in ip.size or not ip.do_center_crop:
            raise UserError(
                f"{model_dir}/preprocessor_config.json: export supports CLIP-style preprocessing "
                f"(size.shortest_edge and do_center_crop); "
                f"got size={ip.size}, do_center_crop={ip.do_center_crop}"
            )
        size = [ip.crop_size["height"], ip.crop_size["width"]]
        with torch.no_grad():
            tokens_per_image = self.image_features(model, torch.zeros(1, 3, *size)).shape[1]
        image = {
            "codec": "clip",
            "token": processor.image_token,
            "token_id": self.image_token_id(model.config),
            "tokens_per_image": int(tokens_per_image),
            "size": size,
            "preprocess": {
                "convert_rgb": bool(ip.do_convert_rgb),
                "resize_shortest_edge": ip.size["shortest_edge"] if ip.do_resize else None,
                "resample": Image.Resampling(ip.resample).name.lower(),
                "crop_size": size,
                "rescale_factor": ip.rescale_factor if ip.do_rescale else None,
                "mean": list(ip.image_mean) if ip.do_normalize else None,
                "std": list(ip.image_std) if ip.do_normalize else None,
            },
        }
        return image, prompt_section(processor, processor.image_token, model_dir)

    def build_tiny(self, out_dir: Path) -> None:
        import torch
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlamaTokenizerFast,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        from edgetune.families.tiny import TINY_TEXT, TINY_VISION, train_byte_level_bpe

        specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
        tokenizer = LlamaTokenizerFast(
            tokenizer_object=train_byte_level_bpe(specials),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
            padding_side="right",
        )
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_size, patch_size = 32, 8
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=LLAVA_CHAT_TEMPLATE,
            image_token="<image>",
        )
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                **TINY_VISION,
                image_size=image_size,
                patch_size=patch_size,
                projection_dim=32,
            ),
            text_config=LlamaConfig(
                **TINY_TEXT,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
        )
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
