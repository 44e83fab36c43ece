"""Data-parallel training under accelerate: 2 CPU processes with the gloo backend, started by the real
launcher (`edgetune train --num-processes 2` runs `accelerate launch`), against one process running
the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgetune.checkpoint import complete_checkpoints
from edgetune.cli import app
from edgetune.recipe import load_recipe
from edgetune.train import train
from tests.conftest import make_recipe

pytestmark = pytest.mark.xdist_group("distributed")
runner = CliRunner()
STEPS = 12
# Per process: batch 2 x grad_accum 2; 2 processes -> a global batch of 8 per step, which one process
# draws as batch 4 x grad_accum 2. Answers differ in length, so the loss normalisation over the
# global batch's answer tokens (not per process or per micro-batch) is what makes the two agree.
PER_PROCESS = {"batch_size": 2, "grad_accum": 2}
ONE_PROCESS = {"batch_size": 4, "grad_accum": 2}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # the same sums in another order: float32 rounding only


def edgetune(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgetune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def recipe_file(tiny_llava_dir, task_dir, tmp_path_factory):
    """The built-in task with answers of 1 to 9 words, so that processes hold different numbers of
    answer tokens (the built-in answers are one word each, where a per-process mean would pass too)."""
    root = tmp_path_factory.mktemp("ddp")
    entries = json.loads((task_dir / "data/train.json").read_text())
    for i, entry in enumerate(entries):
        entry["image"] = str(task_dir / "data" / entry["image"])
        entry["conversations"][1]["value"] = " ".join([entry["conversations"][1]["value"]] * (1 + i * 5 % 9))
    (root / "train.json").write_text(json.dumps(entries))
    return make_recipe(root / "recipe.yaml", tiny_llava_dir, task_dir, data={"train": str(root / "train.json")},
                       train={"max_steps": STEPS, "save_every": 4, "warmup_steps": 2, **PER_PROCESS})


@pytest.fixture(scope="module")
def one_process(recipe_file):
    """The reference: one process, the same global batch."""
    run_dir = recipe_file.parent / "one-process"
    train(load_recipe(recipe_file, [f"train.{k}={v}" for k, v in ONE_PROCESS.items()]), run_dir)
    return run_dir


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_training(run_dir, reference) -> None:
    torch.testing.assert_close(torch.tensor(losses(run_dir)), torch.tensor(losses(reference)), **TOLERANCE)
    ours, theirs = load_file(run_dir / "adapter/adapter_model.safetensors"), load_file(reference / "adapter/adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **TOLERANCE)


def test_two_gloo_processes_train_as_one_process_with_the_global_batch(recipe_file, one_process):
    run_dir = recipe_file.parent / "two-processes"
    out, err = edgetune("train", str(recipe_file), "--out", str(run_dir), "--num-processes", "2").communicate(timeout=600)
    assert err == "", err  # nothing from the launcher, nothing from the second process
    assert "2 processes: global batch 2 x 2 x 2 = 8" in out, out
    assert out.count("run written to") == 1, out
    assert_same_training(run_dir, one_process)
    assert sorted(p.name for p in recipe_file.parent.iterdir() if p.name.startswith(("two", ".two"))) == ["two-processes"]
    tokens = [r["tokens"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "tokens" in r]
    assert tokens == [r["tokens"] for r in map(json.loads, (one_process / "metrics.jsonl").read_text().splitlines()) if "tokens" in r]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker process with RANK=rank among the launcher's descendants."""
    children = {launcher.pid}
    for _ in range(3):  # edgetune -> accelerate -> torchrun workers
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if parent in children:
                    children.add(int(pid))
            except (OSError, IndexError, ValueError):
                continue
    for pid in children - {launcher.pid}:
        try:
            if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def test_a_killed_process_stops_the_run_resumably_and_it_resumes_with_1_or_2_processes(recipe_file, one_process):
    run_dir = recipe_file.parent / "killed"
    launcher = edgetune("train", str(recipe_file), "--out", str(run_dir), "--num-processes", "2")
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run_dir):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    os.kill(rank_pid(launcher, 1), signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a process of this run failed or was killed" in lines[0], err
    assert f"edgetune train --resume {run_dir} --num-processes 2" in lines[0]
    assert not (run_dir / "run.json").exists() and complete_checkpoints(run_dir)

    # One process may continue it with the same global batch (4 x 2), not with another one.
    refused = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert refused.exit_code == 2 and "global batch is 2 x 2 process(es) = 4" in refused.output, refused.output
    assert "--set train.batch_size=4" in refused.output
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.batch_size=4"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_training(run_dir, one_process)


def test_bad_process_counts_and_a_cuda_optimizer_on_cpu_processes_are_one_line(recipe_file, tmp_path):
    result = runner.invoke(app, ["train", str(recipe_file), "--out", str(tmp_path / "run"), "--num-processes", "0"])
    assert result.exit_code == 2 and "--num-processes 0: give at least 1" in result.output
    result = runner.invoke(app, ["train", str(recipe_file), "--out", str(tmp_path / "run"), "--num-processes", "2",
                                 "--set", "train.optimizer=paged_adamw_8bit"])
    assert result.exit_code == 2 and "paged_adamw_8bit needs a CUDA GPU" in result.output
    assert not (tmp_path / "run").exists()


def test_fsdp_is_refused_with_one_line_before_anything_is_written(recipe_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
                             "--main_process_port", "29517", "-m", "edgetune", "train", str(recipe_file), "--out", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=300)
    ours = [line for line in launch.stderr.splitlines() if line.startswith("error: ")]
    assert launch.returncode != 0 and len(ours) == 1, launch.stderr  # one line: the main process's, not one per process
    assert "FSDP is not supported; edgetune trains data-parallel (DDP) only" in ours[0]
    assert not (tmp_path / "run").exists()
