"""ONNX export: a (merged) model directory -> a bundle the torch-free runtime runs (see export/README.md)."""

from edgetune.export.bundle import export_bundle
from edgetune.export.parity import ParityError

__all__ = ["ParityError", "export_bundle"]
