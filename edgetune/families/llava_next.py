"""LLaVA-NeXT (LLaVA-1.6): LLaVA's CLIP tower, MLP projector and LLM, plus any-resolution images.

The processor picks the best of ``image_grid_pinpoints`` for each image, resizes it keeping the
aspect ratio, pads it to that resolution and cuts it into crop-size tiles; a squashed copy of
the whole image comes first. The vision tower and projector run on every crop (what LLaVA's
``image_features`` already does on a [crops, 3, H, W] batch); the model then packs each image's
tile features into one grid, cuts the rows or columns that only saw padding and appends the
learned ``image_newline`` after every row, so the number of image tokens depends on the image's
size. Module paths are LLaVA's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families.base import ModelFamily, get_module
from edgetune.families.llava import LlavaFamily

# llava-hf/llava-v1.6-mistral-7b-hf's chat template (chat_template.json), verbatim.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    connector_row_per_image = False  # one row per crop (and the base image)
    model_class_name = "LlavaNextForConditionalGeneration"
    image_newline = "model.image_newline"  # [hidden], appended after every row of an image's tile grid
    processor_knobs = {
        "image_grid_pinpoints": "the [height, width] resolutions an image may be tiled at, each a multiple "
        "of the crop size; fewer or smaller ones mean fewer image tokens per image",
    }

    def configure_processor(self, processor: Any, knobs: dict[str, Any]) -> None:
        from edgetune.errors import UserError

        if "image_grid_pinpoints" in knobs:
            pinpoints, crop = knobs["image_grid_pinpoints"], processor.image_processor.crop_size["height"]
            pairs = isinstance(pinpoints, list) and pinpoints and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(n, int) and n > 0 and n % crop == 0 for n in p)
                for p in pinpoints
            )
            if not pairs:
                raise UserError(
                    f"model.processor.image_grid_pinpoints: expected a list of [height, width] pairs, each a "
                    f"positive multiple of the crop size {crop} (e.g. [[{crop}, {2 * crop}], [{2 * crop}, {crop}]]); "
                    f"got {pinpoints!r}"
                )
        super().configure_processor(processor, knobs)

    def configure_model(self, model: Any, knobs: dict[str, Any]) -> None:
        """The model unpacks crops by the same pinpoints the processor tiles with."""
        if "image_grid_pinpoints" in knobs:
            model.config.image_grid_pinpoints = knobs["image_grid_pinpoints"]

    def image_problem(self, processor: Any, width: int, height: int) -> str | None:
        """Any aspect ratio: the image is resized into the best pinpoint and padded, never to more than
        the largest pinpoint (LLaVA's center-crop limit does not apply)."""
        return ModelFamily.image_problem(self, processor, width, height)

    # image_features (LLaVA's) maps crops [crops, 3, H, W] -> [crops, tokens per crop, hidden].

    def image_embeds(self, model: Any, inputs: Any) -> Any:
        """LlavaNextModel.get_image_features: each image's crops packed (unpadded tile grid with
        image_newline after every row, after the base image's tokens), images concatenated."""
        import torch

        return torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]))

    def vision_graph(self, model: Any, processor: Any) -> Any:
        """vision.onnx: one image's crops [crops, 3, H, W] -> image_embeds [crops, tokens per crop,
        hidden] and image_newline [hidden]. Packing depends on the image's size, so the runtime
        codec does it (edgetune.runtime.codecs.llava_next); the newline ships as a graph output
        because it is a weight of the model like any other."""
        import torch
        from torch.export import Dim

        from edgetune.families.export_spec import GraphSpec, VisionGraph

        newline_path = self.image_newline

        class CropsAndNewline(VisionGraph):
            def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return super().forward(pixel_values), get_module(self.model, newline_path)

        size = processor.image_processor.crop_size
        return GraphSpec(
            name="vision",
            module=CropsAndNewline(self, model),
            sample_args=(torch.randn(3, 3, size["height"], size["width"]),),
            input_names=["pixel_values"],
            output_names=["image_embeds", "image_newline"],
            dynamic_shapes=({0: Dim("crops")},),
        )

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """LLaVA's CLIP steps for every crop, plus what the "llava_next" codec needs to cut an image
        into crops and count its tokens: the pinpoints, the crop size, the base image's size and
        the side of a crop's square token grid."""
        from edgetune.errors import UserError

        image, prompt = super().bundle_sections(model, processor, model_dir)
        ip, vision = processor.image_processor, model.config.vision_config
        crop_side = vision.image_size // vision.patch_size
        crop, tokens_per_crop = image.pop("size"), image.pop("tokens_per_image")
        if crop != [vision.image_size] * 2 or tokens_per_crop != crop_side**2:
            raise UserError(
                f"{model_dir}: export needs square crops of the vision tower's size ({vision.image_size}) "
                f"giving {crop_side}x{crop_side} tokens (vision_feature_select_strategy 'default'); "
                f"got crop_size={ip.crop_size}, strategy={model.config.vision_feature_select_strategy}"
            )
        if [list(p) for p in ip.image_grid_pinpoints] != [list(p) for p in model.config.image_grid_pinpoints]:
            raise UserError(
                f"{model_dir}: preprocessor_config.json and config.json list different image_grid_pinpoints; "
                "make them equal (the model unpacks the crops the processor makes)"
            )
        image.update(
            codec="llava_next",
            grid_pinpoints=[list(p) for p in ip.image_grid_pinpoints],
            crop_size=crop[0],
            crop_side=crop_side,
            base_size=ip.size["shortest_edge"],
        )
        return image, prompt

    def build_tiny(self, out_dir: Path) -> None:
        """llava-v1.6-mistral in miniature: 24 px crops of 3x3 patches (9 tokens each), the real
        checkpoint's pinpoints scaled from 336 to 24 px, so a 48x48 image is 2x2 tiles + the base
        image = 51 image tokens, and a wide one picks a 1x2 or 1x3 grid."""
        import torch
        from transformers import (
            CLIPVisionConfig,
            LlamaTokenizerFast,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessor,
            LlavaNextProcessor,
            MistralConfig,
        )

        from edgetune.families.tiny import TINY_TEXT, TINY_VISION, train_byte_level_bpe

        tokenizer = LlamaTokenizerFast(
            tokenizer_object=train_byte_level_bpe(["<unk>", "<s>", "</s>"]),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
            padding_side="left",
        )
        # As in the real checkpoint, <image> and then <pad> follow the base vocabulary.
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        image_size, patch_size = 24, 8
        pinpoints = [[24, 48], [48, 24], [48, 48], [72, 24], [24, 72]]
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=MISTRAL_CHAT_TEMPLATE,
            image_token="<image>",
        )
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(
                **TINY_VISION,
                image_size=image_size,
                patch_size=patch_size,
                projection_dim=32,
            ),
            text_config=MistralConfig(
                **TINY_TEXT,
                vocab_size=len(tokenizer),
                rope_theta=1e6,
                sliding_window=None,  # Mistral-7B-Instruct-v0.2, the checkpoint's LLM, has none
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
