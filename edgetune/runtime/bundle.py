"""The bundle contract as the runtime reads it: manifest.json and the files it names.

``edgetune.export.bundle`` writes bundles; export/README.md documents every manifest field. This
module is the one gate the runtime passes through: after ``load_manifest`` returns, the manifest
has the format version this runtime reads, every section the runtime uses, and every file it
names exists on disk. Anything else is a UserError naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.errors import UserError

# 1: plain bundles. 2: bundles that need a runtime which knows the KV prefix or the image_feature
# decoder input (a format-1 runtime would answer without them). 3: bundles whose image codec is not
# CLIP's, or whose decoder takes M-RoPE positions or extra inputs. Export writes the lowest that fits.
# 4: bundles whose decoder assumes right padding (text.padded_rows), which an older runtime would feed
# left-padded batches.
READABLE_VERSIONS = (1, 2, 3, 4)
PADDED_ROWS = "one_at_a_time"  # text.padded_rows: run a left-padded batch one row at a time
LOGITS_TO_KEEP = "logits_to_keep"  # optional decoder input: logits for the last N positions (0: all)
MANIFEST_FILE = "manifest.json"
KV_PREFIX_FILE = "kv_prefix.safetensors"
GRAPH_NAMES = ("vision", "embed", "decoder")
REQUIRED_SECTIONS = ("family", "precision", "graphs", "text", "image", "tokenizer", "prompt")
REEXPORT = "re-run `edgetune export`"


def load_manifest(bundle_dir: Path | str) -> dict:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; point at a bundle written by `edgetune export` or {REEXPORT}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {REEXPORT}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise UserError(f"{path} is not a bundle manifest (no format_version); point at a bundle written by `edgetune export`")
    version = manifest["format_version"]
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_VERSIONS)
        raise UserError(
            f"{path}: format_version {version!r} is not one this runtime reads ({', '.join(map(str, READABLE_VERSIONS))}); "
            + (f"a newer edgetune wrote it: upgrade edgetune where the bundle runs, or {REEXPORT} with this version"
               if newer else f"{REEXPORT} with this edgetune version")
        )
    for section in REQUIRED_SECTIONS:
        if section not in manifest:
            raise UserError(f"{path} has no '{section}' entry; {REEXPORT}")
    missing_graphs = [name for name in GRAPH_NAMES if name not in manifest["graphs"]]
    if missing_graphs:
        raise UserError(f"{path}: graphs.{missing_graphs[0]} is missing; {REEXPORT}")
    ort_section = manifest.get("ort")
    if ort_section and (set(GRAPH_NAMES) - set(ort_section.get("graphs", {})) or "required_operators" not in ort_section):
        raise UserError(f"{path}: the 'ort' section needs graphs.{{{','.join(GRAPH_NAMES)}}} and required_operators; {REEXPORT}")
    try:
        files = bundle_files(manifest)
    except (KeyError, TypeError, AttributeError) as err:  # a section of the wrong shape
        raise UserError(f"{path} is malformed ({type(err).__name__}: {err}); {REEXPORT}") from None
    for name in files:
        if not (bundle_dir / name).is_file():
            raise UserError(f"{bundle_dir / name} is missing; {REEXPORT}")
    return manifest


def bundle_files(manifest: dict) -> list[str]:
    """Every file the manifest names, relative to the bundle directory."""
    files = []
    for name in GRAPH_NAMES:
        graph = manifest["graphs"][name]
        files += [graph["file"], *graph.get("data_files", [])]
    files.append(manifest["tokenizer"]["file"])
    if manifest.get("kv_prefix"):
        files.append(manifest["kv_prefix"]["file"])
    if manifest.get("ort"):  # the ORT-format twins of the graphs (weights inline) and their operator list
        files += [manifest["ort"]["graphs"][name] for name in GRAPH_NAMES] + [manifest["ort"]["required_operators"]]
    return files
