"""The codec registry: manifest image.codec -> the torch-free class that handles that family's images."""

from __future__ import annotations

from edgetune.errors import UserError
from edgetune.runtime.codecs.base import Codec, EncodedImage, positions_from_mask
from edgetune.runtime.codecs.clip import ClipCodec
from edgetune.runtime.codecs.idefics3 import Idefics3Codec
from edgetune.runtime.codecs.llava_next import LlavaNextCodec
from edgetune.runtime.codecs.paligemma import PaliGemmaCodec
from edgetune.runtime.codecs.qwen2_vl import Qwen2VLCodec

CODECS: dict[str, type[Codec]] = {
    "clip": ClipCodec,
    "llava_next": LlavaNextCodec,
    "qwen2_vl": Qwen2VLCodec,
    "idefics3": Idefics3Codec,
    "paligemma": PaliGemmaCodec,
}

__all__ = ["CODECS", "Codec", "EncodedImage", "get_codec", "positions_from_mask"]


def get_codec(manifest: dict) -> Codec:
    name = manifest["image"].get("codec", "clip")  # format 1 and 2 bundles are all CLIP-style LLaVA
    if name not in CODECS:
        raise UserError(f"manifest.json: image codec '{name}' is unknown to this runtime; update edgetune")
    return CODECS[name](manifest)
