"""Idefics3 and SmolVLM: SigLIP-style vision tower -> pixel shuffle + linear -> Llama LLM.

Both architectures share their modules and module paths in transformers 4.57; they differ in the
classes (``Idefics3*`` vs ``SmolVLM*``) and in SmolVLM2's video processor. The SmolVLM v1
checkpoints (SmolVLM-256M/500M/2B-Instruct) are ``model_type: idefics3``; SmolVLM2's are ``smolvlm``.

An image becomes several tiles: the image processor resizes its longest edge to
``size["longest_edge"]``, rounds both sides up to multiples of ``max_image_size["longest_edge"]``
(the tile size), cuts that grid into tiles and appends the whole image resized to one tile. The
processor writes one ``<image>`` run per tile into the prompt, each behind a ``<row_i_col_j>`` or
``<global-img>`` marker. Every tile has the tile's full size, so a batch only differs in how
many tiles each image has.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgetune.families.base import ModelFamily, get_module, images_only_processor_class

# SmolVLM's conversation format, as the HuggingFaceTB checkpoints' chat_template renders it.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolLM2's special tokens in the order of the real vocabulary: the three text specials, then the
# image-layout tokens (36 tile positions), then the tokens the processor adds.
IMAGE_LAYOUT_TOKENS = ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_LAYOUT_TOKENS,
    "<fake_token_around_image>", "<image>", "<end_of_utterance>",
]


class Idefics3Family(ModelFamily):
    name = "idefics3"
    connector_row_per_image = False  # one row per tile (and the global image)
    model_class_name = "Idefics3ForConditionalGeneration"
    vision_tower = "model.vision_model"
    connector = "model.connector"
    language_model = "model.text_model"
    layers = "model.text_model.layers"
    connector_output = "model.connector.modality_projection.proj"
    config_prefix = "Idefics3"  # Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessor, ...

    processor_knobs = {
        "longest_edge": "pixels of an image's longest side before tiling (SmolVLM: 2048, up to 16 tiles + 1)",
        "tile_size": "pixels of a tile's side, a multiple of patch size x scale factor; sets the image tokens per tile",
        "do_image_splitting": "false: each image is one tile (the whole image at tile size), the fewest tokens",
    }

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def configure_processor(self, processor: Any, knobs: dict[str, Any]) -> None:
        from edgetune.errors import UserError

        image_processor = processor.image_processor
        for knob in ("longest_edge", "tile_size"):
            if knob in knobs and (type(knobs[knob]) is not int or knobs[knob] <= 0):
                raise UserError(f"model.processor.{knob}: expected a positive number of pixels, got {knobs[knob]!r}")
        if "longest_edge" in knobs:
            image_processor.size = {"longest_edge": knobs["longest_edge"]}
        if "do_image_splitting" in knobs:
            if not isinstance(knobs["do_image_splitting"], bool):
                got = knobs["do_image_splitting"]
                raise UserError(f"model.processor.do_image_splitting: expected true or false, got {got!r}")
            image_processor.do_image_splitting = knobs["do_image_splitting"]
        if "tile_size" in knobs:
            tile = knobs["tile_size"]
            # One image token covers (patch size x pixel-shuffle factor) pixels per side.
            unit = image_processor.max_image_size["longest_edge"] // math.isqrt(processor.image_seq_len)
            if tile % unit:
                raise UserError(
                    f"model.processor.tile_size: {tile} is not a multiple of {unit} (patch size x scale factor); "
                    f"try {max(unit, tile // unit * unit)}"
                )
            image_processor.max_image_size = {"longest_edge": tile}
            processor.image_seq_len = (tile // unit) ** 2

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """Tiles [tiles, 3, T, T] -> embeddings [tiles, tokens, hidden], as get_image_features computes
        them for tiles that are not padding.

        transformers' vision embeddings loop over the batch to give each tile position ids from its
        own patch mask, which would fix the tile count in an ONNX trace. Every real tile is a full
        T x T crop, so all tiles share the ids of one full mask: computed once, with the embeddings'
        own formula, and broadcast.
        """
        vision = get_module(model, self.vision_tower)
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        positions = full_tile_position_ids(embeddings, pixel_values.shape[-2:], pixel_values.dtype)
        hidden = patches + embeddings.position_embedding(positions)[None]
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return get_module(model, self.connector)(vision.post_layernorm(hidden))

    def image_embeds(self, model: Any, inputs: Any) -> Any:
        """transformers' own get_image_features on the processor's [batch, frames, 3, T, T]: padding
        frames (all zero) are dropped, real tiles come out in prompt order."""
        features = model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
        return features.reshape(-1, features.shape[-1])

    def vision_graph(self, model: Any, processor: Any) -> Any:
        """vision.onnx: one image's tiles [tiles, 3, T, T] -> image_embeds [tiles, tokens per tile, hidden]."""
        import torch
        from torch.export import Dim

        from edgetune.families.export_spec import GraphSpec, VisionGraph

        tile = processor.image_processor.max_image_size["longest_edge"]
        return GraphSpec(
            name="vision",
            module=VisionGraph(self, model),
            sample_args=(torch.randn(2, 3, tile, tile),),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_shapes=({0: Dim("tiles")},),
        )

    def parity_knobs(self, processor: Any) -> dict[str, Any]:
        """A longest edge of two tiles: the parity images become a 2 x 2 grid and the global view,
        5 frames, where SmolVLM's own 2048 px make 17 (a 4 x 4 grid), each a full pass of the vision
        tower. The frames, the tiling and the row/column markers take the same paths either way."""
        ip = processor.image_processor
        two_tiles = 2 * ip.max_image_size["longest_edge"]
        if ip.do_resize and ip.do_image_splitting and ip.size["longest_edge"] > two_tiles:
            return {"longest_edge": two_tiles}
        return {}

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """Tiling parameters for the runtime codec "idefics3" (edgetune.runtime.codecs.idefics3),
        which rebuilds the tiles and the processor's expanded image text."""
        import torch
        from PIL import Image

        from edgetune.errors import UserError
        from edgetune.families.export_spec import prompt_section

        ip = processor.image_processor
        tile = ip.max_image_size["longest_edge"]
        with torch.no_grad():
            tokens = self.image_features(model, torch.zeros(1, 3, tile, tile)).shape[1]
        if tokens != processor.image_seq_len:
            raise UserError(
                f"{model_dir}/processor_config.json: image_seq_len {processor.image_seq_len} but a {tile} px tile "
                f"gives {tokens} image tokens; set image_seq_len to {tokens}"
            )
        image = {
            "codec": "idefics3",
            "token": processor.image_token,
            "token_id": self.image_token_id(model.config),
            "tokens_per_tile": int(tokens),
            "tile_token": processor.fake_image_token,
            "global_token": "<global-img>",
            "preprocess": {
                "longest_edge": ip.size["longest_edge"] if ip.do_resize else None,
                "tile_size": tile,
                "split": bool(ip.do_image_splitting),
                "resample": Image.Resampling(ip.resample).name.lower(),
                "rescale_factor": ip.rescale_factor if ip.do_rescale else None,
                "mean": list(ip.image_mean) if ip.do_normalize else None,
                "std": list(ip.image_std) if ip.do_normalize else None,
            },
        }
        return image, prompt_section(processor, processor.image_token, model_dir)

    def new_processor(self, image_processor: Any, tokenizer: Any, image_seq_len: int, chat_template: str) -> Any:
        """The family's processor from its parts."""
        from transformers import Idefics3Processor

        return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template)

    def build_tiny(self, out_dir: Path) -> None:
        build_tiny_smolvlm(self, out_dir)


class SmolVLMFamily(Idefics3Family):
    """SmolVLM2 (model_type ``smolvlm``): the same model under other class names, and a processor
    that wants a video processor.

    transformers' SmolVLMProcessor requires a video processor (its module even imports
    torchvision), and SmolVLMVideoProcessor requires torchvision, which has no CPU build to pair
    with a CPU torch. edgetune handles images only, so (as for Qwen2-VL) it assembles the real
    processor class without one; prompts, placeholder expansion and image tensors are
    SmolVLMProcessor's own code. Its __init__ also insists on num2words (in the train extra).
    """

    name = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    config_prefix = "SmolVLM"

    def new_processor(self, image_processor: Any, tokenizer: Any, image_seq_len: int, chat_template: str) -> Any:
        """SmolVLMProcessor without a video processor: None fills its video_processor argument,
        which the images-only class has no part for."""
        from transformers.processing_utils import ProcessorMixin

        import_smolvlm_processing()
        # SmolVLMProcessor.apply_chat_template only adds the video processor's frame settings.
        processor_class = images_only_processor_class(
            "SmolVLMProcessor", apply_chat_template=ProcessorMixin.apply_chat_template
        )
        return processor_class(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template)

    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """The checkpoint's processor without its video processor, with the slow image processor
        (the runtime's reference) and the fast tokenizer (the bundle ships its tokenizer.json)."""
        from transformers import AutoTokenizer, SmolVLMImageProcessor
        from transformers.processing_utils import ProcessorMixin

        image_processor = SmolVLMImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        settings = ProcessorMixin.get_processor_dict(path)[0]
        return self.new_processor(
            image_processor,
            tokenizer,
            image_seq_len=settings.get("image_seq_len", 169),  # 169: SmolVLMProcessor's default
            chat_template=settings.get("chat_template") or tokenizer.chat_template,
        )

    def prompt_inputs(self, processor: Any, prompts: list[str], images: list[list[Any]]) -> Any:
        """As the default, with the images nested by row: SmolVLMProcessor takes a flat list as
        one row's images, where Idefics3Processor splits it by each row's ``<image>`` count."""
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
            for prompt, row in zip(prompts, images)
        ]
        return processor(text=texts, images=images, padding=True, padding_side="left",
                         input_data_format="channels_last", return_tensors="pt")


def import_smolvlm_processing() -> None:
    """Import transformers' processing_smolvlm where torchvision is missing.

    The module imports three video prompt strings from video_processing_smolvlm, which imports
    torchvision first thing, so without torchvision SmolVLMProcessor cannot even be imported. A
    processor without a video processor never uses those strings: a stand-in module holding them
    is in sys.modules while processing_smolvlm imports, and is removed again.
    """
    import importlib
    import importlib.util
    import sys
    import types

    video = "transformers.models.smolvlm.video_processing_smolvlm"
    if "transformers.models.smolvlm.processing_smolvlm" in sys.modules or importlib.util.find_spec("torchvision"):
        return
    stand_in = types.ModuleType(video, "video prompt strings for processing_smolvlm's import only")
    stand_in.DEFAULT_VIDEO_INTRO = stand_in.DEFAULT_MEDIA_OUTTRO = stand_in.FRAME_TIMESTAMP_MESSAGE = None
    sys.modules[video] = stand_in
    try:
        importlib.import_module("transformers.models.smolvlm.processing_smolvlm")
    finally:
        del sys.modules[video]


def full_tile_position_ids(embeddings: Any, size: Any, dtype: Any) -> Any:
    """The vision embeddings' position ids for one tile whose patch mask is all ones, shape [patches].

    Mirrors Idefics3VisionEmbeddings.forward for a single full mask, dtype included: transformers
    4.55-4.57 computes the fractional coordinates in the pixels' dtype, so float32 and bfloat16
    give different ids (transformers issue 41190).
    """
    import torch

    rows, cols = int(size[0]) // embeddings.patch_size, int(size[1]) // embeddings.patch_size
    side = embeddings.num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    fractional_h = torch.arange(rows, dtype=dtype) / rows * (1 - 1e-6)
    fractional_w = torch.arange(cols, dtype=dtype) / cols * (1 - 1e-6)
    bucket_h = torch.bucketize(fractional_h, boundaries, right=True)
    bucket_w = torch.bucketize(fractional_w, boundaries, right=True)
    return (bucket_h[:, None] * side + bucket_w).flatten()


def build_tiny_smolvlm(family: Idefics3Family, out_dir: Path) -> None:
    """A tiny random-weight SmolVLM-256M look-alike with ``family``'s classes (Idefics3 or SmolVLM).

    Tiles are 32 px (4x4 patches of 8 px, pixel shuffle 2: 4 image tokens per tile) and images are
    resized to a longest edge of 64 px, so the built-in task's 48 px images become 2x2 tiles plus
    the global image: 20 image tokens.
    """
    import torch
    import transformers
    from transformers import GPT2TokenizerFast, LlamaConfig

    from edgetune.families.tiny import TINY_TEXT, TINY_VISION, train_byte_level_bpe

    tokenizer = GPT2TokenizerFast(
        tokenizer_object=train_byte_level_bpe(SPECIAL_TOKENS),
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        add_prefix_space=False,
        padding_side="right",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]}
    )
    prefix = family.config_prefix
    tile, patch, scale = 32, 8, 2
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = family.new_processor(
        image_processor, tokenizer, image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=SMOLVLM_CHAT_TEMPLATE
    )
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=getattr(transformers, f"{prefix}VisionConfig")(
            **TINY_VISION,
            image_size=tile,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            **TINY_TEXT,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,  # as SmolVLM-256M-Instruct
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
