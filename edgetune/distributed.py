"""Data-parallel training: the few things the loop needs to know about its processes.

``accelerate launch -m edgetune train RECIPE`` (or ``edgetune train --num-processes N``, which runs
that launcher) starts one process per GPU, or N CPU processes with the gloo backend; accelerate sets
up torch.distributed and says which process this is. Every process loads the 4-bit base onto its own
device, takes its shard of each global batch (edgetune.train.ShuffledBatches), and DDP averages the
gradients, so the parameters and the optimizer state stay the same everywhere. The main process
alone writes the run directory, the log, the progress bar and the checkpoints.

Nothing here is edgetune's own distributed code beyond that bookkeeping: accelerate starts and
connects the processes and wraps the model (``Accelerator.prepare_model``: DDP).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import UserError


@dataclass
class Processes:
    """This process's place among the run's processes (one process: rank 0 of 1, no accelerate)."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None  # accelerate.Accelerator when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward and backward through: DDP around it when there are processes to sync."""
        return self.accelerator.prepare_model(model) if self.distributed else model

    def no_sync(self, model: torch.nn.Module):
        """Skip DDP's gradient all-reduce (for every micro-batch of a step but its last)."""
        return self.accelerator.no_sync(model) if self.distributed else contextlib.nullcontext()

    def sum(self, value: float) -> float:
        """``value`` summed over the processes (float64 on the way, so token counts stay exact)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def gather(self, item: Any) -> list[Any]:
        """Every process's ``item`` (any picklable value produced by edgetune itself), in rank order."""
        if not self.distributed:
            return [item]
        from accelerate.utils import gather_object

        return gather_object([item])

    def wait(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()


def launched_processes() -> bool:
    """True in a process started by accelerate launch / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_processes(device_type: str) -> Processes:
    """This process's Processes: accelerate's view of the launch (CPU processes use gloo)."""
    if not launched_processes():
        return Processes()
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise UserError(f"accelerate launch: {name} is not supported; edgetune trains data-parallel (DDP) only: "
                            "accelerate launch --multi_gpu --num_processes N -m edgetune train ...")
    # find_unused_parameters=False: every trainable tensor takes part in every step's loss.
    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise UserError(f"accelerate launch: {accelerator.distributed_type.value} is not supported; edgetune trains "
                        "data-parallel (DDP) only: accelerate launch --multi_gpu --num_processes N -m edgetune train ...")
    processes = Processes(accelerator.process_index, accelerator.num_processes, accelerator)
    if not processes.is_main:
        from edgetune.progress import console

        console.quiet = True  # one progress bar and one set of messages: the main process's
    # torchrun stops the other processes with SIGTERM when one fails; as an exception it goes
    # through the loop's clean-up, which says how to resume, instead of ending silently.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return processes


class ProcessesStopped(RuntimeError):
    """The launcher stopped this process (SIGTERM), as torchrun does to all when one fails."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise ProcessesStopped("the launcher sent SIGTERM")


def process_device(processes: Processes, device: torch.device) -> torch.device:
    """Each process's own GPU (its local rank) under a multi-GPU launch; the CPU stays the CPU."""
    if processes.distributed and device.type == "cuda":
        return processes.accelerator.device
    return device
