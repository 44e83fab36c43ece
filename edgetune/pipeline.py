"""Stage glue for verbs that accept more than one kind of artifact."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgetune.errors import UserError


def export_any(source: Path, bundle: Path, options: Any, overwrite: bool = False, **export_options: Any) -> dict:
    """Export a merged model directory, or a run directory (merged first, in a temporary directory).

    options: an edgetune.export.precision.PrecisionOptions; export_options: export_bundle's others."""
    from edgetune.evaluate import kind_of_dir
    from edgetune.export import export_bundle
    from edgetune.merge import dequantize_then_merge

    kind = kind_of_dir(source)
    if kind == "bundle":
        raise UserError(f"{source} is already an ONNX bundle; pass a run or merged model directory")
    if kind == "model":
        return export_bundle(source, bundle, overwrite=overwrite, **vars(options), **export_options)
    with tempfile.TemporaryDirectory(prefix="edgetune-merge-") as tmp:
        merged = Path(tmp) / "merged"
        dequantize_then_merge(source, merged)
        return export_bundle(merged, bundle, overwrite=overwrite, run_dir=source, **vars(options), **export_options)
