"""PaliGemma: SigLIP vision tower -> one linear projector -> Gemma LLM, as a prefix LM.

What sets it apart from LLaVA (all read from transformers 4.57's modeling_paligemma.py):
- no chat template: the processor builds "<image>" * N + "<bos>" + prompt + "\\n" and, for
  training, tokenizes the answer + "<eos>" as the second sequence of a pair ("suffix"), which
  gives token_type_ids (0 prefix, 1 suffix) and labels on the suffix only;
- prefix-LM attention: image and prompt tokens attend to each other in both directions, the answer
  causally. In training the model needs token_type_ids *and* labels to build that mask (without
  token_type_ids it attends bidirectionally over the answer too); in inference the prefill is
  bidirectional over the whole prompt and each decode step sees everything before it;
- image features are divided by sqrt(hidden) after the projector, because Gemma multiplies every
  input embedding by sqrt(hidden) (so text embeddings are scaled, image embeddings are not);
- positions are 1-indexed (position 1 for the first real token);
- tied input/output embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.errors import UserError
from edgetune.families.base import ModelFamily, get_module

IMAGE_TOKEN = "<image>"

# The processor tokenizes the answer on its own (no leading space), as Gemma's tokenizer has the bare
# words: with them the built-in task's answers are one token each, as they are for the real model.
ANSWER_WORDS = "red\ngreen\nblue\nyellow\npurple\norange\nwhite\nblack\ncircle\nsquare\ntriangle"


def prompt_text(question: str, images: int = 1) -> str:
    """The text PaliGemmaProcessor turns into "<image>" * N + "<bos>" + question + "\\n"."""
    return IMAGE_TOKEN * images + question


def prefix_lm_mask(attention_mask: Any, token_type_ids: Any, seq: int) -> Any:
    """[batch, 1, seq, total] bool (True = attend) for the last ``seq`` of ``total`` tokens: a key is
    visible if it is not padding and it is a prefix token (type 0) or not after the query. This is
    the mask PaliGemma trains with; for a prefill over the prompt and for one-token decode steps it
    is also the one generate uses."""
    import torch

    total = attention_mask.shape[1]
    query = torch.arange(seq, device=attention_mask.device) + (total - seq)
    key = torch.arange(total, device=attention_mask.device)
    visible = (key[None, :] <= query[:, None])[None] | (token_type_ids[:, None, :] == 0)
    return (visible & (attention_mask[:, None, :] != 0))[:, None]


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_class_name = "PaliGemmaForConditionalGeneration"
    vision_tower = "model.vision_tower"
    connector = "model.multi_modal_projector"
    language_model = "model.language_model"
    layers = "model.language_model.layers"
    connector_output = "model.multi_modal_projector.linear"

    decoder_extras = ("token_type_ids",)
    fuse_decoder = False  # the prefix attends bidirectionally: not GroupQueryAttention's causal mask

    # ---- load ---------------------------------------------------------------------------------

    def load_processor(self, path: str, trust_remote_code: bool = False) -> Any:
        """The slow SiglipImageProcessor (the runtime's reference) with the fast Gemma tokenizer.

        ``AutoProcessor.from_pretrained(path, use_fast=False)`` would also pick the slow
        sentencepiece GemmaTokenizer, which needs tokenizer.model and cannot write tokenizer.json.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

        remote = {"trust_remote_code": trust_remote_code}
        return PaliGemmaProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path, use_fast=False, **remote),
            tokenizer=AutoTokenizer.from_pretrained(path, **remote),
        )

    # ---- data -------------------------------------------------------------------------------

    def training_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Without labels PaliGemma builds its inference mask (bidirectional over the answer too), so
        the training mask goes in ready-made: prefix_lm_mask, as the additive [batch, 1, seq, seq] form
        the model passes through unchanged."""
        import torch

        inputs = super().training_inputs(batch)
        seq = batch["input_ids"].shape[1]
        visible = prefix_lm_mask(batch["attention_mask"], batch["token_type_ids"], seq)
        dtype = batch["pixel_values"].dtype
        inputs["attention_mask"] = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        return inputs

    def encode_sample(self, processor: Any, sample: Any, max_length: int) -> dict[str, Any]:
        """input_ids, labels on the answer + eos only, token_type_ids (0 prompt, 1 answer) and pixels.

        The processor's own ``suffix`` path, as PaliGemma is fine-tuned: the model needs
        token_type_ids with the labels to keep the prompt bidirectional and the answer causal.
        """
        from edgetune.data import cut_to_max_length, open_image

        if len(sample.turns) != 2:
            raise UserError(
                f"sample {sample.id}: PaliGemma answers one question per image and has no chat format; "
                f"this entry has {len(sample.turns)} turns: split it into one entry per question"
            )
        images = [open_image(p) for p in sample.images]
        inputs = processor(
            text=[prompt_text(sample.question, len(images))], images=images, suffix=[sample.answer],
            input_data_format="channels_last", return_tensors="pt",
        )
        encoded = {
            "input_ids": inputs["input_ids"][0],
            "labels": inputs["labels"][0],
            "token_type_ids": inputs["token_type_ids"][0],
            "pixel_values": inputs["pixel_values"],
        }
        return cut_to_max_length(encoded, max_length, sample.id)

    def prompt_inputs(self, processor: Any, prompts: list[str], images: list[list[Any]]) -> Any:
        texts = [prompt_text(prompt, len(row)) for prompt, row in zip(prompts, images)]
        flat = [image for row in images for image in row]
        return processor(text=texts, images=flat, padding=True, padding_side="left",
                         input_data_format="channels_last", return_tensors="pt")

    # ---- images -----------------------------------------------------------------------------

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """PaliGemmaModel.get_image_features: SigLIP's last hidden state, projected, / sqrt(hidden)."""
        hidden = get_module(model, self.vision_tower)(pixel_values).last_hidden_state
        features = get_module(model, self.connector)(hidden)
        return features / (self.text_config(model.config).hidden_size**0.5)

    def connector_output_scale(self, config: Any) -> float:
        return self.text_config(config).hidden_size**-0.5

    # ---- export -----------------------------------------------------------------------------

    def vision_graph(self, model: Any, processor: Any) -> Any:
        """pixel_values [batch, 3, H, W] at SigLIP's plain-resize size (no crop) -> [batch, tokens, hidden]."""
        from edgetune.families.export_spec import fixed_size_vision_graph

        return fixed_size_vision_graph(self, model, processor.image_processor.size)

    def decoder_extra_inputs(self, batch: Any, seq: Any, total: Any) -> dict[str, tuple[Any, dict]]:
        """token_type_ids [batch, total]: 0 for the prompt (and a KV prefix), 1 for generated tokens."""
        import torch

        return {"token_type_ids": (torch.tensor([[0, 0, 0, 0, 0, 1, 1]] * 2), {0: batch, 1: total})}

    def language_model_kwargs(self, attention_mask: Any, past_length: Any, extras: dict[str, Any]) -> dict[str, Any]:
        seq = attention_mask.shape[1] - past_length
        return {"attention_mask": prefix_lm_mask(attention_mask, extras["token_type_ids"], seq)}

    def bundle_sections(self, model: Any, processor: Any, model_dir: Path) -> tuple[dict, dict]:
        """SigLIP preprocessing (a plain resize to a fixed size) and the prompt PaliGemmaProcessor
        builds, "<image>" * N + "<bos>" + prompt + "\\n" (runtime codec "paligemma")."""
        import torch
        from PIL import Image

        ip = processor.image_processor
        if not ip.do_resize:
            raise UserError(f"{model_dir}/preprocessor_config.json: export needs do_resize: true (a fixed image size)")
        size = [ip.size["height"], ip.size["width"]]
        with torch.no_grad():
            tokens_per_image = int(self.image_features(model, torch.zeros(1, 3, *size)).shape[1])
        if tokens_per_image != processor.image_seq_length:
            raise UserError(
                f"{model_dir}/preprocessor_config.json: image_seq_length is {processor.image_seq_length} but the "
                f"vision tower makes {tokens_per_image} image embeddings per image; fix image_seq_length"
            )
        image = {
            "codec": "paligemma",
            "token": processor.image_token,
            "token_id": self.image_token_id(model.config),
            "tokens_per_image": tokens_per_image,
            "size": size,
            "preprocess": {
                "convert_rgb": True,  # edgetune's data loader converts every image to RGB first
                "resize": size,
                "resize_shortest_edge": None,
                "resample": Image.Resampling(ip.resample).name.lower(),
                "crop_size": None,
                "rescale_factor": ip.rescale_factor if ip.do_rescale else None,
                "mean": list(ip.image_mean) if ip.do_normalize else None,
                "std": list(ip.image_std) if ip.do_normalize else None,
            },
        }
        single_turn = IMAGE_TOKEN + processor.tokenizer.bos_token + "{prompt}\n"
        prompt = {
            "chat_template": None,  # PaliGemma has none
            "single_turn": single_turn,
            "image_placeholder": IMAGE_TOKEN,
            "image_placeholder_offset": 0,
        }
        return image, prompt

    def position_ids(self, model: Any, inputs: Any) -> Any:
        """1-indexed, as PaliGemma's prepare_inputs_for_generation makes them."""
        return super().position_ids(model, inputs) + 1

    def extend_inputs(self, inputs: Any, next_ids: Any) -> dict[str, Any]:
        """Prompt + one generated token, with token_type_ids and labels so that the model builds
        its prefix-LM mask (it does only when it gets both): the prompt does not see the new token,
        as in generate's decode step, where the token comes after the cached prompt."""
        import torch

        out = super().extend_inputs(inputs, next_ids)
        prompt = torch.zeros_like(inputs["input_ids"])
        out["token_type_ids"] = torch.cat([prompt, torch.ones_like(next_ids)], dim=1)
        out["labels"] = torch.cat([prompt - 100, next_ids], dim=1)
        return out

    def build_tiny(self, out_dir: Path) -> None:
        import torch
        from transformers import (
            GemmaConfig,
            GemmaTokenizerFast,
            PaliGemmaConfig,
            PaliGemmaForConditionalGeneration,
            PaliGemmaProcessor,
            SiglipImageProcessor,
            SiglipVisionConfig,
        )

        from edgetune.families.tiny import CORPUS, TINY_VISION, train_byte_level_bpe

        # Gemma's special tokens, in Gemma's order (pad 0, eos 1, bos 2, unk 3).
        tokenizer = GemmaTokenizerFast(
            tokenizer_object=train_byte_level_bpe(["<pad>", "<eos>", "<bos>", "<unk>"], corpus=CORPUS + [ANSWER_WORDS]),
            unk_token="<unk>",
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
        )
        image_size, patch_size = 32, 8
        image_processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_seq_length=(image_size // patch_size) ** 2,
        )
        # Adds "<image>" and the 1024 <locNNNN> + 128 <segNNN> tokens, and turns add_bos_token off
        # (the processor writes "<bos>" into the text itself).
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        hidden = 64
        config = PaliGemmaConfig(
            vision_config=SiglipVisionConfig(
                **TINY_VISION,
                image_size=image_size,
                patch_size=patch_size,
                vision_use_head=False,
            ).to_dict(),
            text_config=GemmaConfig(
                hidden_size=hidden,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,  # multi-query attention, as Gemma-2B
                head_dim=16,
                hidden_activation="gelu_pytorch_tanh",
                vocab_size=len(tokenizer),
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
                # See tiny.TINY_TEXT: a random LM head needs rows large enough for confident logits.
                initializer_range=0.3,
            ).to_dict(),
            image_token_index=processor.image_token_id,
            projection_dim=hidden,
            hidden_size=hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
