"""LLaVA-1.5's images: one fixed-size CLIP crop per image, a fixed number of image tokens."""

from __future__ import annotations

from PIL import Image

from edgetune.runtime import preprocess
from edgetune.runtime.codecs.base import Codec, EncodedImage


class ClipCodec(Codec):
    def encode(self, image: Image.Image) -> EncodedImage:
        pixels = preprocess.pixel_values(image, self.image["preprocess"])
        return EncodedImage({"pixel_values": pixels[None]}, self.image["tokens_per_image"])
