"""The ORT format: a bundle's three graphs converted for ONNX Runtime's mobile and reduced-size builds.

``add_ort_models`` runs onnxruntime's own tools on a bundle and returns the manifest's "ort" section:

- ``onnxruntime.tools.convert_onnx_models_to_ort`` (optimization style Fixed, level all):
  vision.ort, embed.ort and decoder.ort beside the .onnx files, and required_operators.config, the
  operators of all three, which a reduced-size onnxruntime build takes (``--include_ops_by_config``).
  The .ort files hold their weights inline (no .data files) and run on a full onnxruntime too.
- ``onnxruntime.tools.check_onnx_model_mobile_usability`` on each .onnx graph: how much of
  it NNAPI (Android) and CoreML (iOS) could run and the tool's recommendation. The tool only logs
  text, so the one part written by hand here is reading its numbers back (``read_usability_log``).

Both run as ``python -m <tool>`` would (RUN_TOOL), in subprocesses of this interpreter, on hard
links to the bundle's graphs in a private folder: no other file beside the bundle is converted, the
tools' temporary files stay out of the bundle, and a tool that crashes fails the conversion with a
UserError (or the usability check with an "error" entry) instead of the export's process.

Limits, read from onnxruntime's source (onnxruntime/core/graph/model_load_utils.h, model.cc) and
checked against the installed onnxruntime by ``ort_format_problem``: the converter is an
InferenceSession that saves the optimized graph, so it takes what onnxruntime loads: default-domain
opsets from 7 (older ones load only with a warning that support is not guaranteed) up to the last
released opset its schema registry knows (newer ones are refused unless ALLOW_RELEASED_ONNX_OPSET_ONLY=0).
An ORT-format file is a flatbuffer, which cannot exceed 2 GB (onnxruntime issue #16573), so a graph
with more weights than that has no ORT form (quantize it, or ship the .onnx files).

Sources: https://onnxruntime.ai/docs/performance/model-optimizations/ort-format-models.html,
https://onnxruntime.ai/docs/tutorials/mobile/helpers/model-usability-checker.html and the tools'
code under onnxruntime/tools in the installed package.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from edgetune.errors import UserError
from edgetune.runtime.bundle import GRAPH_NAMES

REQUIRED_OPERATORS = "required_operators.config"  # the name the converter gives it
OPTIMIZATION = {"style": "Fixed", "level": "all"}  # ORT's advice for the CPU EP; "Runtime" suits NNAPI/CoreML
# onnxruntime loads default-domain opsets below 7 with a warning that support is not guaranteed.
OLDEST_OPSET = 7
FLATBUFFER_LIMIT = 2**31 - 1  # bytes in one ORT-format file
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"
USABILITY_CHECKER = "onnxruntime.tools.check_onnx_model_mobile_usability"
# `python -m <tool>` with torch hidden: onnxruntime/tools/__init__.py imports torch whenever it is
# installed, for a helper neither tool uses (1.5 s per run, and a torch that fails to import would fail them).
RUN_TOOL = "import runpy, sys; sys.modules['torch'] = None; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"


def ort_format_problem(opset: int) -> str | None:
    """None if the installed onnxruntime's ORT-format converter takes graphs of this default-domain
    ONNX opset, else one line saying which opsets it takes."""
    newest = newest_convertible_opset()
    if OLDEST_OPSET <= opset <= newest:
        return None
    fix = "; a newer onnxruntime may take it" if opset > newest else ""
    return f"onnxruntime {ort.__version__}'s ORT-format converter takes ONNX opsets {OLDEST_OPSET} to {newest}, not {opset}{fix}"


@functools.cache
def newest_convertible_opset() -> int:
    """The newest opset onnxruntime's loader accepts (the last released one it knows), found by
    converting a one-node model as the converter would: onnxruntime exposes no such number."""
    newest = OLDEST_OPSET - 1
    with tempfile.TemporaryDirectory() as tmp:
        while newest < 1000 and converts(newest + 1, Path(tmp) / "probe.ort"):
            newest += 1
    return newest


def converts(opset: int, ort_path: Path) -> bool:
    """Whether onnxruntime saves a one-node graph of this opset in the ORT format (as the converter does)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail / InvalidGraph types
        return False
    return True


def add_ort_models(bundle_dir: Path, manifest: dict) -> dict:
    """Write <graph>.ort for the bundle's three graphs and required_operators.config into
    ``bundle_dir``; return the manifest's "ort" section (file names relative to the bundle).

    The .onnx files and their data files (one graph may read another's .data file) are read, not
    changed; nothing else is left in ``bundle_dir``. Raises UserError naming the graph and the
    converter's message when a graph does not convert.
    """
    bundle_dir = Path(bundle_dir)
    onnx_files = {name: manifest["graphs"][name]["file"] for name in GRAPH_NAMES}
    ort_files = {name: str(Path(file).with_suffix(".ort")) for name, file in onnx_files.items()}
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".ort-") as tmp:
        src, out = Path(tmp).resolve() / "onnx", Path(tmp).resolve() / "ort"  # the tools print resolved paths
        src.mkdir()
        needed = set()
        for name, file in onnx_files.items():
            data = external_data(bundle_dir / file)
            weights = (bundle_dir / file).stat().st_size + sum(data.values())
            if weights > FLATBUFFER_LIMIT:
                raise UserError(f"{file}: {weights / 2**30:.1f} GB of weights; an ORT-format file holds at most 2 GB "
                                "(a flatbuffer), so export without --ort or at a lower precision")
            needed |= {file, *manifest["graphs"][name].get("data_files", []), *data}
        for file in needed:
            link_or_copy(bundle_dir / file, src / file)
        convert(src, out, env=private_temp(tmp))
        for file in ort_files.values():
            os.replace(out / file, bundle_dir / file)
        # The converter lists the models it read by absolute path, here the private folder's.
        config = (out / REQUIRED_OPERATORS).read_text().replace(f"{out}{os.sep}", "")
        (bundle_dir / REQUIRED_OPERATORS).write_text(config)
        usability = {name: mobile_usability(bundle_dir / file, env=private_temp(tmp)) for name, file in onnx_files.items()}
    return {
        "graphs": ort_files,
        "required_operators": REQUIRED_OPERATORS,
        "optimization": dict(OPTIMIZATION),
        "onnxruntime": ort.__version__,
        "mobile_usability": usability,
    }


def external_data(graph_path: Path) -> dict[str, int]:
    """{data file: bytes this graph reads from it} for the graph's initializers."""
    model = onnx.load(str(graph_path), load_external_data=False)
    read: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {item.key: item.value for item in init.external_data}
        location = entry["location"]
        length = entry.get("length")
        if length is None:  # the rest of the file
            length = (graph_path.parent / location).stat().st_size - int(entry.get("offset", 0))
        read[location] = read.get(location, 0) + int(length)
    return read


def link_or_copy(source: Path, target: Path) -> None:
    # Hard links need no privileges on any OS (symlinks do on Windows) and cost no space.
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, target)


def private_temp(folder: str) -> dict[str, str]:
    """The environment with temporary files (the usability checker writes an optimized copy of the
    graph) inside ``folder``, which is removed afterwards."""
    return {**os.environ, "TMPDIR": folder, "TEMP": folder, "TMP": folder}


def convert(src: Path, out: Path, env: dict[str, str]) -> None:
    """convert_onnx_models_to_ort on every .onnx file in ``src``, writing into ``out``."""
    env = {**env, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": OPTIMIZATION["level"]}  # it names files by level
    command = [sys.executable, "-c", RUN_TOOL, CONVERTER, str(src), "--output_dir", str(out), "--optimization_style", OPTIMIZATION["style"]]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode == 0:
        return
    # It prints "Converting optimized ONNX model <path> to ..." before each graph and
    # "Error converting <path>: <message>" when onnxruntime raises; a crash leaves only the first.
    failed = re.findall(r"^Error converting (.+?\.onnx): (.*)$", result.stdout, re.MULTILINE)
    started = re.findall(r"^Converting optimized ONNX model (.+?\.onnx) to ", result.stdout, re.MULTILINE)
    if failed:
        graph, message = failed[-1]
    else:
        graph = started[-1] if started else "a graph"
        message = last_line(result.stderr) or f"exit code {result.returncode}"
    message = " ".join(message.replace(f"{src}{os.sep}", "").split())
    raise UserError(f"{Path(graph).name} cannot be converted to the ORT format: {message}")


def mobile_usability(graph_path: Path, env: dict[str, str]) -> dict:
    """check_onnx_model_mobile_usability on one .onnx graph, summarised (read_usability_log); a
    checker that fails gives {"error": its last line} (the check is advice, not a gate)."""
    result = subprocess.run([sys.executable, "-c", RUN_TOOL, USABILITY_CHECKER, str(graph_path)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": last_line(result.stderr) or f"exit code {result.returncode}"}
    return read_usability_log(result.stderr + result.stdout)


PARTITIONS = re.compile(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP\.")
UNSUPPORTED = re.compile(r"Unsupported ops: (.*)")
SUITABLE = re.compile(r"Model should perform well with (.+?) (as is|if modified to have fixed input shapes): (\w+)")


def read_usability_log(text: str) -> dict:
    """The usability checker's log -> {"recommendation": "cpu" | "try_nnapi_coreml" | None,
    <ep>: {"partitions", "supported_nodes", "nodes", "suitable" (YES / MAYBE / NO), "unsupported_ops",
    "fixed_shapes": the same counts and verdict if the graph's dynamic dims were fixed}} per EP
    (nnapi, coreml_neuralnetwork, coreml_mlprogram). Lines it does not recognise are skipped."""
    summary: dict = {"recommendation": None}
    current = None
    for line in text.splitlines():
        if match := PARTITIONS.search(line):
            partitions, supported, nodes, ep = match.groups()
            entry = summary.setdefault(ep_key(ep), {})
            # The checker reports each EP as the graph is, then again as if its shapes were fixed.
            current = entry if "partitions" not in entry else entry.setdefault("fixed_shapes", {})
            current.update(partitions=int(partitions), supported_nodes=int(supported), nodes=int(nodes))
        elif (match := UNSUPPORTED.search(line)) and current is not None:
            current.setdefault("unsupported_ops", [op for op in match.group(1).strip().split(",") if op])
        elif match := SUITABLE.search(line):
            ep, when, verdict = match.groups()
            entry = summary.setdefault(ep_key(ep), {})
            (entry if when == "as is" else entry.setdefault("fixed_shapes", {}))["suitable"] = verdict
        elif "should be used with the CPU EP" in line:
            summary["recommendation"] = "cpu"
        elif "recommended to compare the performance" in line:
            summary["recommendation"] = "try_nnapi_coreml"
    for entry in summary.values():  # the ops an EP lacks do not depend on shapes: listed once
        if isinstance(entry, dict) and entry.get("fixed_shapes", {}).get("unsupported_ops") == entry.get("unsupported_ops"):
            entry["fixed_shapes"].pop("unsupported_ops", None)
    return summary


def ep_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")  # "CoreML MLProgram" -> "coreml_mlprogram"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
