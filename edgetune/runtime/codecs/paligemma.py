"""PaliGemma's images and its prefix-LM decoder, torch-free.

Images: SigLIP preprocessing, a plain resize to the fixed size (no aspect ratio, no crop) with PIL
on uint8 RGB, then the CLIP steps that follow it (rescale, normalize); a fixed number of image
tokens per image. Decoder: positions are 1-indexed (transformers' generate adds 1), and
token_type_ids tell the graph's prefix-LM mask which tokens are the prompt (0: seen by every
token) and which were generated (1: causal). The prompt is the first step of a generation; a
bundle's KV prefix (prefix tuning) counts as prompt.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgetune.runtime import preprocess
from edgetune.runtime.codecs.base import Codec, EncodedImage, positions_from_mask

TOKEN_TYPES = "token_type_ids"


class PaliGemmaCodec(Codec):
    def encode(self, image: Image.Image) -> EncodedImage:
        params = self.image["preprocess"]
        height, width = params["resize"]
        resized = image.convert("RGB").resize((width, height), preprocess.RESAMPLE[params["resample"]])
        pixels = preprocess.pixel_values(resized, params)  # no shortest-edge resize, no crop: rescale, normalize
        return EncodedImage({"pixel_values": pixels[None]}, self.image["tokens_per_image"])

    def positions(self, input_ids, attention_mask, images, state) -> np.ndarray:
        return positions_from_mask(attention_mask)[:, -input_ids.shape[1] :] + 1

    def decoder_feeds(self, input_ids, attention_mask, state) -> dict[str, np.ndarray]:
        batch, seq = input_ids.shape
        if TOKEN_TYPES not in state:  # the prompt, after the KV prefix if the bundle has one
            prefix = self.manifest.get("kv_prefix", {}).get("length", 0)
            state[TOKEN_TYPES] = np.zeros((batch, prefix + seq), np.int64)
        else:
            state[TOKEN_TYPES] = np.concatenate([state[TOKEN_TYPES], np.ones((batch, seq), np.int64)], axis=1)
        return {TOKEN_TYPES: state[TOKEN_TYPES]}
