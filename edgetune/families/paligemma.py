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

from edgetune.data import Sample, open_image
from edgetune.errors import UserError
from edgetune.families.base import ModelFamily, get_module

IMAGE_TOKEN = "<image>"


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_class_name = "PaliGemmaForConditionalGeneration"
    vision_tower = "model.vision_tower"
    connector = "model.multi_modal_projector"
    language_model = "model.language_model"
    layers = "model.language_model.layers"
    connector_output = "model.multi_modal_projector.linear"

    def load_processor(self, path: str) -> Any:
        """The slow SiglipImageProcessor (the runtime's reference) with the fast Gemma tokenizer.

        ``AutoProcessor.from_pretrained(path, use_fast=False)`` would also pick the slow
        sentencepiece GemmaTokenizer, which needs tokenizer.model and cannot write tokenizer.json.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

        return PaliGemmaProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path, use_fast=False),
            tokenizer=AutoTokenizer.from_pretrained(path),
        )

    def prompt_text(self, question: str, images: int = 1) -> str:
        """What the processor expands to "<image>" * N + "<bos>" + question + "\n"."""
        return IMAGE_TOKEN * images + question

    def encode_sample(self, processor: Any, sample: Sample, max_length: int) -> dict[str, Any]:
        """input_ids, labels on the answer + eos only, token_type_ids (0 prompt, 1 answer) and pixels.

        The processor's own ``suffix`` path, as PaliGemma is fine-tuned: the model needs
        token_type_ids with the labels to keep the prompt bidirectional and the answer causal.
        """
        if len(sample.turns) != 2:
            raise UserError(
                f"sample {sample.id}: PaliGemma answers one question per image and has no chat format; "
                f"this entry has {len(sample.turns)} turns: split it into one entry per question"
            )
        images = [open_image(p) for p in sample.images]
        inputs = processor(
            text=[self.prompt_text(sample.question, len(images))],
            images=[images],
            suffix=[sample.answer],
            return_tensors="pt",
        )
        if inputs["input_ids"].shape[1] > max_length:
            raise UserError(
                f"sample {sample.id}: {inputs['input_ids'].shape[1]} tokens (image tokens included) exceed "
                f"data.max_length={max_length}; raise data.max_length or shorten the conversation"
            )
        return {
            "input_ids": inputs["input_ids"][0],
            "labels": inputs["labels"][0],
            "token_type_ids": inputs["token_type_ids"][0],
            "pixel_values": inputs["pixel_values"],
        }

    def image_features(self, model: Any, pixel_values: Any) -> Any:
        """PaliGemmaModel.get_image_features: SigLIP's last hidden state, projected, / sqrt(hidden)."""
        hidden = get_module(model, self.vision_tower)(pixel_values).last_hidden_state
        features = get_module(model, self.connector)(hidden)
        return features / (self.text_config(model.config).hidden_size**0.5)

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

        from edgetune.families.tiny import train_byte_level_bpe

        # Gemma's special tokens, in Gemma's order (pad 0, eos 1, bos 2, unk 3).
        tokenizer = GemmaTokenizerFast(
            tokenizer_object=train_byte_level_bpe(["<pad>", "<eos>", "<bos>", "<unk>"]),
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
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
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
                # See llava.py: a random LM head needs rows large enough for confident logits.
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
