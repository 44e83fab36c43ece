"""The quickstart end to end through the CLI, and the bundle-facing verbs on its output."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.recipe import load_recipe
from tests.conftest import TORCH_BLOCKER

runner = CliRunner()


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    result = runner.invoke(app, ["quickstart", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_quickstart_lifts_held_out_accuracy_in_pytorch_and_onnx(quickstart_out):
    summary = json.loads((quickstart_out / "summary.json").read_text())
    # The frozen random model answers with noise. Colour questions (about half the held-out set)
    # are learned almost perfectly within the step budget, shapes mostly: 0.6 needs both.
    assert summary["accuracy_before"] <= 0.2
    assert summary["accuracy_after_pytorch"] >= 0.6
    assert summary["accuracy_after_onnx"] >= 0.6
    # Merge and export are exact to float noise, so ONNX answers match PyTorch's but for rare ties.
    assert abs(summary["accuracy_after_onnx"] - summary["accuracy_after_pytorch"]) <= 2 / summary["held_out_samples"]
    assert summary["merge_max_logit_diff"] < 1e-3 and summary["export_parity_max_logit_diff"] < 1e-3
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_quickstart_compares_every_precision(quickstart_out):
    """bundle/ at the chosen precision (fp32 by default), the others in bundles/, from one trace; each
    smaller than the one above it, each answering the held-out questions (fidelity chain)."""
    summary = json.loads((quickstart_out / "summary.json").read_text())
    rows = summary["precisions"]
    assert list(rows) == ["fp32", "fp16", "int8", "int4"]
    sizes = [rows[p]["bundle_mb"] for p in rows]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.6 * sizes[0]
    assert rows["fp32"]["accuracy"] == summary["accuracy_after_onnx"] and rows["fp32"]["agreement"] == 1.0
    for precision in ("fp16", "int8", "int4"):
        manifest = json.loads((quickstart_out / "bundles" / precision / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["fidelity"][-1]["accuracy"] == rows[precision]["accuracy"]
        assert rows[precision]["accuracy"] >= 0.5 * rows["fp32"]["accuracy"]  # the benchmark's bar is 98%/99%


def test_quickstart_leaves_a_rerunnable_recipe_and_every_artifact(quickstart_out):
    for part in ("model/config.json", "data/train.json", "data/eval.json", "recipe.yaml", "run/adapter",
                 "run/loss.png", "merged/model.safetensors", "bundle/manifest.json", "summary.json"):
        assert (quickstart_out / part).exists(), part
    recipe = load_recipe(quickstart_out / "recipe.yaml")
    assert recipe.model.path == str((quickstart_out / "model").resolve())
    assert recipe.data.train == (quickstart_out / "data/train.json").resolve()
    written = yaml.safe_load((quickstart_out / "recipe.yaml").read_text())
    assert written["model"]["path"] == "model" and written["data"]["train"] == "data/train.json"  # relative: movable


def test_quickstart_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["quickstart", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_eval_and_infer_on_the_bundle_without_torch(quickstart_out, tmp_path):
    """The device-side verbs, in a process where importing torch or transformers fails."""
    image = quickstart_out / "data/images/eval-0000.png"
    script = TORCH_BLOCKER + "from edgetune.cli import app\napp()\n"
    bundle = quickstart_out / "bundle"
    infer = subprocess.run([sys.executable, "-c", script, "infer", str(bundle), "--image", str(image), "--prompt",
                            "What color is the shape?"], capture_output=True, text=True)
    assert infer.returncode == 0, infer.stderr
    report_file = tmp_path / "eval.json"
    evaluated = subprocess.run([sys.executable, "-c", script, "eval", str(bundle), "--data",
                                str(quickstart_out / "data/eval.json"), "--out", str(report_file)],
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(report_file.read_text())
    summary = json.loads((quickstart_out / "summary.json").read_text())
    assert report["accuracy"] == summary["accuracy_after_onnx"] and report["total"] == 60
    from edgetune.runtime import OnnxVLM

    assert infer.stdout.strip() == OnnxVLM.load(bundle).generate(image, "What color is the shape?").strip()
    assert infer.stdout.strip() in {"red", "green", "blue", "yellow", "purple"}  # the tuned model answers in kind


def test_bundle_problems_are_one_line_errors(quickstart_out, tmp_path):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(quickstart_out / "bundle", broken)
    (broken / "decoder.onnx").unlink()
    result = runner.invoke(app, ["infer", str(broken), "--image", str(quickstart_out / "data/images/eval-0000.png"),
                                 "--prompt", "hi"])
    assert result.exit_code == 2 and "decoder.onnx" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["infer", str(quickstart_out / "bundle"), "--image", str(tmp_path / "nope.png"),
                                 "--prompt", "hi"])
    assert result.exit_code == 2 and "nope.png" in result.output


def test_each_verb_runs_alone_on_the_previous_stage_artifact(quickstart_out, tmp_path):
    """train -> merge -> export -> eval as separate CLI calls, and export straight from a run."""
    run = runner.invoke(app, ["train", str(quickstart_out / "recipe.yaml"), "--out", str(tmp_path / "run"),
                              "--max-steps", "5", "--seed", "3"])
    assert run.exit_code == 0, run.output
    assert load_recipe(tmp_path / "run/recipe.yaml").train.max_steps == 5
    merged = runner.invoke(app, ["merge", str(quickstart_out / "run"), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0 and "max |logit diff|" in merged.output
    from_run = runner.invoke(app, ["export", str(quickstart_out / "run"), "--out", str(tmp_path / "bundle")])
    assert from_run.exit_code == 0, from_run.output
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "bundle"), "--data", str(quickstart_out / "data/eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads((quickstart_out / "summary.json").read_text())
    assert json.loads((tmp_path / "bundle/eval.json").read_text())["accuracy"] == summary["accuracy_after_onnx"]
