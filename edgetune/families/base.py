"""What a model family must tell the rest of edgetune.

A family is one transformers vision-language architecture (``config.model_type``). It names
where the three parts live inside the model (vision tower, connector, LLM), which linear layers
PEFT methods may target, and how to turn pixels into the image embeddings that replace the image
placeholder tokens. Loading, training, merging and export are written against this interface
only, so a new family is one file plus one line in ``edgetune.families.FAMILIES``.

The hooks, by stage (defaults fit LLaVA-style models; a family overrides what it does differently):

    load      load_processor, processor_knobs, configure_processor, configure_model, keep_precise
    data      encode_sample (training inputs, loss on the answer), prompt_inputs (generation inputs),
              image_problem (image sizes the processor cannot take; edgetune.data_check asks it)
    images    image_embeds (processor output -> the rows that replace the image tokens),
              image_cache_call (what of the frozen tower train.cache_image_features caches)
    export    vision_graph, decoder_extra_inputs / language_model_kwargs, bundle_sections,
              position_ids and extend_inputs (how PyTorch is called in the parity check)
    runtime   the manifest's image.codec names the torch-free counterpart in edgetune.runtime.codecs
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


class ModelFamily:
    name: str  # transformers' model_type, e.g. "llava"
    model_class_name: str  # e.g. "LlavaForConditionalGeneration"
    vision_tower: str  # dotted module path inside the model
    connector: str
    language_model: str  # the decoder stack (embeddings, layers, final norm)
    lm_head: str = "lm_head"
    layers: str  # the ModuleList of decoder layers
    attention: str = "self_attn"  # inside a decoder layer
    mlp: str = "mlp"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    key_value_linears: tuple[str, ...] = ("k_proj", "v_proj")  # IA3 rescales their outputs
    mlp_output_linear: str = "down_proj"  # IA3 rescales its input: the MLP's inner activations
    connector_output: str | None = None  # the connector's last nn.Linear (AdaLink folds into it)
    connector_row_per_image: bool = True  # False: the connector sees crops or tiles, several per image
    rope: str = "1d"  # "1d": position_ids [batch, seq]; "mrope": [3, batch, seq] (Qwen2-VL)
    # Recipe model.processor.<knob> settings this family's processor takes -> what each sets.
    processor_knobs: dict[str, str] = {}
    # Decoder inputs beyond inputs_embeds, attention_mask, position_ids and the cache (see
    # decoder_extra_inputs); the runtime codec feeds them.
    decoder_extras: tuple[str, ...] = ()
    # Export the decoder with onnxruntime's fused attention (edgetune.export.fusions) when it matches
    # PyTorch; False where the attention is not causal (PaliGemma's prefix-LM mask).
    fuse_decoder: bool = True

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def keep_precise(self) -> list[str]:
        """Module names bitsandbytes must not quantize: everything but the LLM's linears."""
        return [self.vision_tower.split(".")[-1], self.connector.split(".")[-1], self.lm_head]

    def num_layers(self, config: Any) -> int:
        return self.text_config(config).num_hidden_layers

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def image_token_id(self, config: Any) -> int:
        return config.image_token_index

    def linear_regex(self, placement: str, layer_ids: list[int] | None = None) -> str:
        """A regex for peft's ``target_modules`` matching the LLM's linears only.

        placement: "attn" (self-attention projections), "mlp" or "both". The vision tower and the
        connector never match, whatever their own layer names are.
        """
        names = {
            "attn": self.attention_linears,
            "mlp": self.mlp_linears,
            "both": self.attention_linears + self.mlp_linears,
        }[placement]
        return self.module_regex(names, layer_ids)

    def module_regex(self, names: tuple[str, ...], layer_ids: list[int] | None = None) -> str:
        """A regex matching the LLM's submodules called ``names`` (in attention or MLP) in ``layer_ids``."""
        layers = r"\d+" if layer_ids is None else "(" + "|".join(str(i) for i in layer_ids) + ")"
        parts = f"({re.escape(self.attention)}|{re.escape(self.mlp)})"
        return rf"^{re.escape(self.layers)}\.{layers}\.{parts}\.({'|'.join(names)})$"

    # ---- load ---------------------------------------------------------------------------------

    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """The checkpoint's processor, with the slow image processor (the runtime's reference)."""
        from edgetune.load import load_processor

        return load_processor(path, trust_remote_code)

    def configure_processor(self, processor: Any, knobs: dict[str, Any]) -> None:
        """Apply the recipe's model.processor settings (already checked against processor_knobs)."""
        for knob, value in knobs.items():
            setattr(processor.image_processor, knob, value)

    def parity_knobs(self, processor: Any) -> dict[str, Any]:
        """model.processor settings under which the export's parity check runs its images (none by
        default: the processor's own). A family whose own settings make many vision frames per image
        returns smaller ones that run the same graphs and the same preprocessing paths; the export
        then checks the runtime's preprocessing at the own settings separately, without the model."""
        return {}

    def configure_model(self, model: Any, knobs: dict[str, Any]) -> None:
        """Apply the model.processor settings that the model reads too (after configure_processor);
        none by default. They are saved with a merged model's config."""

    # ---- data -------------------------------------------------------------------------------

    def encode_sample(self, processor: Any, sample: Any, max_length: int) -> dict[str, Any]:
        """input_ids, labels (-100 outside the answers) and the processor's image tensors."""
        from edgetune.data import encode_sample

        return encode_sample(processor, sample, max_length)

    def image_problem(self, processor: Any, width: int, height: int) -> str | None:
        """Why the configured ``processor`` cannot take an image of ``width`` x ``height`` pixels (as
        edgetune.data.open_image delivers it: EXIF orientation applied), with the fix; None if it
        can. Default: only an image without pixels; any other size the processor resizes to what the
        vision tower takes (PaliGemma's SigLIP squashes it to a fixed square, Idefics3/SmolVLM resize
        the longest edge and tile, LLaVA-NeXT tiles and pads any aspect ratio)."""
        if width < 1 or height < 1:
            return f"the image is {width}x{height} pixels; replace or remove it"
        return None

    def training_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs for a training forward whose loss edgetune computes itself from the
        answer tokens' logits (edgetune.train.answer_token_loss): the batch without its labels."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def prompt_inputs(self, processor: Any, prompts: list[str], images: list[list[Any]]) -> Any:
        """Model inputs for generating answers: one single-turn prompt per row about its images
        (PIL, 8-bit RGB from edgetune.runtime.preprocess.open_image), rendered with the chat template,
        left-padded when there are several rows. The images' layout is stated (channels_last, as PIL
        gives them): a 1- or 3-pixel-high image would otherwise be read as channels-first."""
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
            for prompt, row in zip(prompts, images)
        ]
        flat = [image for row in images for image in row]
        return processor(text=texts, images=flat, padding=True, padding_side="left",
                         input_data_format="channels_last", return_tensors="pt")

    # ---- images -----------------------------------------------------------------------------

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """Pixels -> image embeddings in the LLM's hidden size, shape [num_images, tokens, hidden]."""
        raise NotImplementedError

    def connector_output_scale(self, config: Any) -> float:
        """What the model multiplies the connector's output by to make the image embeddings (LLaMA-
        Adapter's visual prompt records their mean, which the runtime takes from vision.onnx)."""
        return 1.0

    def image_embeds(self, model: Any, inputs: Any) -> Any:
        """The processor's output -> [image tokens, hidden]: the rows the model writes into the
        image-token positions, in reading order (what the bundle's runtime must reproduce)."""
        features = self.image_features(model, inputs["pixel_values"])
        return features.reshape(-1, features.shape[-1])

    def image_cache_call(self, model: Any) -> Any:
        """How ``model`` calls its frozen vision tower, for train.cache_image_features: an
        edgetune.image_cache.ImageCacheCall naming the module the cache stands in for, how one call
        splits into images and what of the output the model reads (the connector's input). Default:
        ``vision_tower`` takes one row per image, crop or tile in every tensor argument and the model
        reads its last_hidden_state (PaliGemma's SigLIP, Idefics3's vision transformer)."""
        from edgetune.image_cache import RowwiseCall

        return RowwiseCall(self.vision_tower, fields=("last_hidden_state",))

    # ---- export -----------------------------------------------------------------------------

    def vision_graph(self, model: Any, processor: Any) -> Any:
        """The GraphSpec of vision.onnx (edgetune.export.graphs); default: a fixed-size
        pixel_values [batch, 3, H, W] -> image_embeds [batch, tokens, hidden]."""
        from edgetune.families.export_spec import fixed_size_vision_graph

        return fixed_size_vision_graph(self, model, processor.image_processor.crop_size)

    def decoder_extra_inputs(self, batch: Any, seq: Any, total: Any) -> dict[str, tuple[Any, dict]]:
        """name -> (sample tensor for batch 2, seq 3, total 7; dynamic dims) for decoder_extras."""
        return {}

    def language_model_kwargs(self, attention_mask: Any, past_length: Any, extras: dict[str, Any]) -> dict[str, Any]:
        """The mask arguments the exported decoder passes to the language model."""
        return {"attention_mask": attention_mask}

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """The manifest's "image" section (image.codec names the runtime codec) and "prompt" section."""
        from edgetune.errors import UserError

        raise UserError(f"exporting '{self.name}' models is not supported yet")

    def position_ids(self, model: Any, inputs: Any) -> Any:
        """position_ids to call the PyTorch model with, as generate() would (None: the model's own)."""
        import torch

        from edgetune.runtime.codecs import positions_from_mask

        return torch.from_numpy(positions_from_mask(inputs["attention_mask"].numpy()))

    def extend_inputs(self, inputs: Any, next_ids: Any) -> dict[str, Any]:
        """``inputs`` with one more (generated) token per row, for a full PyTorch forward."""
        import torch

        out = dict(inputs)
        out["input_ids"] = torch.cat([inputs["input_ids"], next_ids], dim=1)
        mask = inputs["attention_mask"]
        out["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return out

    def build_tiny(self, out_dir: Path) -> None:
        """Write an offline random-weight model of this family that ``from_pretrained`` loads."""
        raise NotImplementedError


def get_module(model: Any, dotted: str) -> Any:
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def images_only_processor_class(name: str, **methods: Any) -> type:
    """transformers' processor class ``name`` without the video processor among its parts (every
    video processor needs torchvision, which has no CPU build to pair with a CPU torch); ``methods``
    replace those of the class that read the video processor. The class keeps its name, which
    save_pretrained writes as processor_class."""
    import transformers

    base = getattr(transformers, name)
    namespace = {"attributes": ["image_processor", "tokenizer"], "__module__": base.__module__, **methods}
    return type(name, (base,), namespace)
