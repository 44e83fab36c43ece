"""`edgetune sweep` over every method on the built-in task: its outputs, and that every method
learns the task (held-out accuracy well above the untrained model's)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.methods import METHODS

runner = CliRunner()
STEPS = 800  # the quickstart's budget: at 500 steps prefix tuning reaches only 40% (seed 0)


@pytest.fixture(scope="module")
def sweep_out(tiny_llava_dir, tmp_path_factory):
    from edgetune.builtin_task import write_task

    root = tmp_path_factory.mktemp("sweep")
    write_task(root / "data")  # the quickstart's full task: 1000 train, 60 held-out images
    recipe = {
        "model": {"path": str(tiny_llava_dir)},
        "data": {"train": "data/train.json", "eval": "data/eval.json", "max_length": 128},
        "train": {"max_steps": STEPS, "lr": 3e-3, "batch_size": 8, "warmup_steps": 10, "eval_every": 0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["sweep", str(root / "recipe.yaml"), "--methods", ",".join(sorted(METHODS)),
                                 "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_sweep_writes_table_chart_and_every_run(sweep_out):
    runs = json.loads((sweep_out / "sweep.json").read_text())
    assert sorted(r["method"] for r in runs) == sorted(METHODS)
    table = (sweep_out / "sweep.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert (sweep_out / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_learns_the_task(sweep_out, name):
    """The frozen random model scores 0% (it never answers with a colour or shape word). A model
    that learned only the answer format and guessed among the answer words would score about 0.27
    (1/5 for colours, 1/3 for shapes, half the questions each); 0.45 needs it to read the image.
    Measured at this budget (BENCHMARKS.md, 3 seeds, connector tuned): every run >= 0.56, prefix
    tuning the lowest; this test's seed-0 runs: prefix 0.58, every other method >= 0.70."""
    run = next(r for r in json.loads((sweep_out / "sweep.json").read_text()) if r["method"] == name)
    assert run["accuracy"] >= 0.45, run
    assert abs(run["onnx_accuracy"] - run["accuracy"]) <= 2 / 60, run  # export changes at most rare ties


def test_sweep_bad_input(tmp_path, write_recipe):
    result = runner.invoke(app, ["sweep", str(write_recipe()), "--methods", "lora,dora", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "unknown method 'dora'" in result.output and "lora" in result.output
    result = runner.invoke(app, ["sweep", str(write_recipe()), "--connector", "maybe", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--connector" in result.output
    assert not (tmp_path / "s").exists()
