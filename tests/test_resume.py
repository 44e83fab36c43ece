"""Checkpoints and resume, the non-finite guard, Ctrl-C, and the permissions of what edgetune writes.

The crash tests run the real CLI in a subprocess and kill it with a real signal; the resumed run
must end with the same trained tensors as a run never interrupted, bit for bit (CPU, one thread).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgetune.checkpoint import CHECKPOINTS, complete_checkpoints, load_latest_checkpoint
from edgetune.cli import app
from edgetune.errors import UserError
from edgetune.io import atomic_output_dir
from tests.conftest import make_recipe

pytestmark = pytest.mark.xdist_group("resume")
runner = CliRunner()
STEPS, SAVE_EVERY = 16, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def edgetune(*args: str, **popen) -> subprocess.Popen:
    code = "import torch; torch.set_num_threads(1); from edgetune.cli import app; app()"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def trained_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter/adapter_model.safetensors")


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def crash_recipe(tiny_llava_dir, task_dir, tmp_path_factory):
    """LoRA with dropout (so the RNG state matters) and a checkpoint every 4 of 16 steps."""
    return make_recipe(tmp_path_factory.mktemp("resume") / "recipe.yaml", tiny_llava_dir, task_dir,
                       method={"dropout": 0.1},
                       train={"max_steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 8, "keep_checkpoints": 2})


@pytest.fixture(scope="module")
def uninterrupted(crash_recipe):
    run_dir = crash_recipe.parent / "uninterrupted"
    code, out = finish(edgetune("train", str(crash_recipe), "--out", str(run_dir)))
    assert code == 0, out
    assert not (run_dir / CHECKPOINTS).exists()  # a completed run keeps its artifacts only
    return run_dir


def assert_same_run(run_dir, reference) -> None:
    ours, theirs = trained_tensors(run_dir), trained_tensors(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different[:3]
    assert losses(run_dir) == losses(reference) and len(losses(run_dir)) == STEPS
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] is not None


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_tensors(crash_recipe, uninterrupted):
    run_dir = crash_recipe.parent / "killed"
    # Anywhere from the first checkpoint to the end of the uninterrupted run's time for the steps
    # after it, finishing included: mid-step, while saving a checkpoint, while writing the adapter.
    step_seconds = [r["step_s"] for r in map(json.loads, (uninterrupted / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]
    delay = random.Random().uniform(0, sum(step_seconds[SAVE_EVERY:]))
    process = edgetune("train", str(crash_recipe), "--out", str(run_dir))
    wait_for(lambda: complete_checkpoints(run_dir), process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "run.json").exists(), f"finished before the kill ({delay:.2f} s)"
    killed_at = complete_checkpoints(run_dir)[-1].name
    # What a kill while saving leaves, whether or not this one hit it: a checkpoint's scratch folder
    # and a metrics line cut short. Neither may be taken for a whole one.
    (run_dir / CHECKPOINTS / ".step-999999.partial").mkdir()
    (run_dir / CHECKPOINTS / ".step-999999.partial" / "state.json").write_text('{"step": 999999')
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 99, "loss": 1.')
    code, out = finish(edgetune("train", "--resume", str(run_dir)))
    assert code == 0, out
    assert "resuming at step" in out, out
    assert_same_run(run_dir, uninterrupted)
    assert not [p for p in run_dir.rglob("*.partial")], "a scratch file survived the resumed run"
    print(f"killed {delay:.2f} s after the first checkpoint; resumed from {killed_at}")


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(crash_recipe, uninterrupted):
    run_dir = crash_recipe.parent / "ctrl-c"
    process = edgetune("train", str(crash_recipe), "--out", str(run_dir))
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and '"step": 2,' in metrics.read_text(), process)
    process.send_signal(signal.SIGINT)
    code, out = finish(process)
    assert code == 130, out
    assert f"continue with: edgetune train --resume {run_dir}" in out, out
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint is not None and 2 <= checkpoint.step < STEPS  # the step Ctrl-C came in, not the last periodic one
    code, out = finish(edgetune("train", "--resume", str(run_dir)))
    assert code == 0, out
    assert_same_run(run_dir, uninterrupted)


def test_an_absurd_learning_rate_stops_at_the_first_non_finite_loss_and_the_run_resumes(write_recipe, tmp_path):
    recipe = write_recipe(train={"lr": 1e20, "warmup_steps": 0, "save_every": 0})
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--out", str(run_dir)])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: step 2: loss nan is not finite; stopped.")
    assert f"The last good state (step 1) is in {run_dir / CHECKPOINTS / 'step-000001'}" in message
    assert "lower train.lr (now 1e+20)" in message and "ids train-" in message
    assert f"edgetune train --resume {run_dir}" in message
    assert not (run_dir / "run.json").exists() and not (run_dir / "adapter").exists()
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1]

    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.lr=3e-3"])
    # lr 1e20 made step 1's update itself the damage, so the resumed run meets the same loss and
    # says that resuming cannot help; the checkpoint stays for a user who wants to look at it.
    assert result.exit_code == 2, result.output
    assert "again right after resuming from" in result.output and "start again with --overwrite" in result.output
    assert load_latest_checkpoint(run_dir).step == 1

    result = runner.invoke(app, ["train", str(recipe), "--out", str(run_dir), "--overwrite", "--set", "train.lr=3e-3"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "run.json").read_text())["final_loss"] < json.loads((run_dir / "run.json").read_text())["first_loss"]


def test_skip_nonfinite_skips_and_reports_bad_steps_then_stops(write_recipe, tmp_path):
    recipe = write_recipe(train={"lr": 1e20, "warmup_steps": 0, "save_every": 0, "skip_nonfinite": 2})
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "step 4: loss nan is not finite; stopped." in result.output
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_nonfinite"] for r in records if "skipped_nonfinite" in r]
    assert [s["step"] for s in skipped] == [2, 3] and all(len(s["ids"]) == 4 for s in skipped)


def test_resume_refuses_what_it_cannot_continue(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 3, "save_every": 1})
    run_dir = tmp_path / "run"
    (run_dir / CHECKPOINTS).mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.read_text())
    (run_dir / "metrics.jsonl").write_text("")  # an unfinished run, killed before its first checkpoint

    result = runner.invoke(app, ["train", str(recipe), "--out", str(run_dir)])
    assert result.exit_code == 2 and f"continue it with `edgetune train --resume {run_dir}`" in result.output

    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.batch_size=2"])
    assert result.exit_code == 2
    assert "train.batch_size is 2 but the run was trained with 4" in result.output

    result = runner.invoke(app, ["train", "--resume", str(run_dir)])  # from step 0: no checkpoint yet
    assert result.exit_code == 0, result.output
    assert (run_dir / "run.json").is_file()

    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "this run is complete" in result.output

    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory of edgetune train" in result.output


def test_outputs_keep_the_users_permissions(write_recipe, tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "bundle") as scratch:
            (scratch / "file").write_text("x")
        assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        assert runner.invoke(app, ["train", str(write_recipe(train={"max_steps": 2})), "--out", str(tmp_path / "run")]).exit_code == 0
        for path in (tmp_path / "run", tmp_path / "run/adapter"):
            assert path.stat().st_mode & 0o777 == 0o755, path
        assert (tmp_path / "run/run.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        with atomic_output_dir(tmp_path / "private") as scratch:
            pass
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(previous)


def test_overwrite_replaces_only_what_edgetune_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="was not written by edgetune"):
        with atomic_output_dir(mine, overwrite=True):
            pass
    assert (mine / "thesis.tex").read_text() == "years of work"
    with atomic_output_dir(tmp_path / "bundle") as scratch:
        (scratch / "manifest.json").write_text("{}")
    with atomic_output_dir(tmp_path / "bundle", overwrite=True) as scratch:
        (scratch / "manifest.json").write_text('{"new": 1}')
    assert json.loads((tmp_path / "bundle/manifest.json").read_text()) == {"new": 1}
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with atomic_output_dir(tmp_path / "a-file", overwrite=True):
            pass


def test_a_failed_overwrite_leaves_the_earlier_run_as_it_was(write_recipe, tiny_llava_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["train", str(write_recipe(train={"max_steps": 2})), "--out", str(run_dir)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llava_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # found only when the weights load, after the run started
    result = runner.invoke(app, ["train", str(write_recipe(model={"path": str(broken)})), "--out", str(run_dir), "--overwrite"])
    assert result.exit_code == 2 and "model.safetensors is truncated" in result.output, result.output
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model", "recipe.yaml", "run"]  # nothing moved aside is left
