"""What a codec is: one family's prompt/image boundary, torch-free.

A codec turns a picture into the vision graph's inputs, says what text stands for the image in
the prompt, runs vision.onnx into the rows that replace the image tokens, and computes the
decoder's position ids and any extra decoder inputs the family needs. The defaults are LLaVA's:
a fixed number of image tokens per image, 1-D positions counted over real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class EncodedImage:
    feeds: dict[str, np.ndarray]  # vision.onnx's inputs for this one image
    tokens: int  # image embeddings it becomes = image tokens it takes in the prompt
    info: dict[str, Any] = field(default_factory=dict)  # what prompt text or positions need (grid, tiles)


class Codec:
    def __init__(self, manifest: dict):
        self.manifest = manifest
        self.image = manifest["image"]

    def encode(self, image: Image.Image) -> EncodedImage:
        """One image, 8-bit RGB as edgetune.runtime.preprocess.open_image returns it (OnnxVLM.encode_image
        reads every image through it), -> the vision graph's feeds and its token count."""
        raise NotImplementedError

    def image_text(self, encoded: EncodedImage) -> str:
        """The text that replaces the prompt's image placeholder: one image token per embedding."""
        return self.image["token"] * encoded.tokens

    def embeds(self, session: Any, encoded: EncodedImage) -> np.ndarray:
        """vision.onnx on one image -> [tokens, hidden]."""
        (image_embeds,) = session.run(None, encoded.feeds)
        return image_embeds.reshape(-1, image_embeds.shape[-1])

    def positions(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[EncodedImage] | None, state: dict
    ) -> np.ndarray:
        """position_ids for the new tokens; ``state`` persists across the steps of one generation."""
        return positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]

    def decoder_feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, state: dict) -> dict[str, np.ndarray]:
        """The decoder inputs named in the family's decoder_extras (none by default)."""
        return {}


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """1-D RoPE positions: each real token's index among the real tokens; padding gets 1, as in
    transformers' generate (its value is irrelevant, padding is masked)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)
