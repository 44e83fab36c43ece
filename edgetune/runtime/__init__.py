"""The on-device runtime: run an exported bundle with onnxruntime, numpy, tokenizers and pillow.

Nothing under edgetune.runtime imports torch or transformers (tests/test_runtime.py checks this in
a subprocess that blocks both), so ``pip install edgetune`` without extras is enough to run a bundle.
"""

from edgetune.runtime.bundle import load_manifest
from edgetune.runtime.generate import OnnxVLM

__all__ = ["OnnxVLM", "load_manifest"]
