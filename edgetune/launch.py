"""``edgetune train --num-processes N``: the same command under ``accelerate launch``, N processes.

accelerate's launcher (torchrun underneath) starts the processes, one per GPU, or N CPU processes
with the gloo backend where there is no GPU; edgetune.distributed is what each of them does. What
this module adds is the user's view: the processes' one-line messages pass through, the launcher's
own multi-line failure report (a traceback per process) does not, unless --debug; and a run that
stops says, in one line, how to resume it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from edgetune.checkpoint import complete_checkpoints
from edgetune.errors import UserError
from edgetune.recipe import Recipe

OUR_LINES = ("error: ", "interrupted", "warning: ")  # how edgetune's own stderr lines start


def launch_training(args: list[str], num_processes: int, run_dir: Path, recipe: Recipe) -> int:
    """Run ``edgetune <args>`` as ``num_processes`` data-parallel processes; returns the exit code
    edgetune itself would give (0, 1, 2 or 130)."""
    import torch

    from edgetune.progress import debug_enabled

    on_gpu = torch.cuda.is_available() and recipe.train.device != "cpu"
    if on_gpu and torch.cuda.device_count() < num_processes:
        raise UserError(f"--num-processes {num_processes}: only {torch.cuda.device_count()} GPU(s) are visible; "
                        "give at most that many (one process per GPU)")
    if recipe.train.optimizer == "paged_adamw_8bit" and not on_gpu:
        raise UserError("train.optimizer: paged_adamw_8bit needs a CUDA GPU per process; use adamw for CPU processes")
    env = dict(os.environ)
    if not on_gpu:  # share the cores out; torchrun would give each process one thread
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    if debug_enabled():
        env["EDGETUNE_DEBUG"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "edgetune", *args]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    ours = []
    for line in process.stderr:
        if debug_enabled() or line.startswith(OUR_LINES):
            sys.stderr.write(line)
            sys.stderr.flush()
            ours.append(line)
    code = process.wait()
    if code == 0:
        return 0
    said = [line for line in ours if not line.startswith("warning: ")]
    if said:
        last = said[-1]
        return 130 if last.startswith("interrupted") else 1 if "re-run with --debug" in last else 2
    saved = complete_checkpoints(run_dir)
    hint = f"; the run can continue from {saved[-1]}: edgetune train --resume {run_dir} --num-processes {num_processes}" if saved else ""
    sys.stderr.write(f"error: a training process stopped (launcher exit code {code}) before it could say why; "
                     f"re-run with --debug for its output{hint}\n")
    return 1


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes' rendezvous (two runs at once must not share one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
