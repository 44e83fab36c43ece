"""ONNX export: a (merged) model directory -> a bundle the torch-free runtime runs (see export/README.md)."""

from edgetune.export.bundle import ParityError, export_bundle

__all__ = ["ParityError", "export_bundle"]
