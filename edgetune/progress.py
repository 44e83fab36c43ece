"""Console output shared by the stages: one rich console, progress bars, memory readings."""

from __future__ import annotations

import os
import resource
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)
_debug = {"on": False}


def set_debug(on: bool) -> None:
    """--debug for this invocation: tracebacks on errors, and the libraries' own logs."""
    _debug["on"] = on


def debug_enabled() -> bool:
    return _debug["on"] or bool(os.environ.get("EDGETUNE_DEBUG"))


def peak_memory_mb() -> float:
    """Peak GPU memory allocated if CUDA is in use, else this process's peak resident set."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_progress(description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def quiet_libraries() -> None:
    """Keep the terminal for edgetune's own output: the libraries' info-level chatter goes."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for noisy in ("transformers", "peft", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*no longer tied after merging.*")
    warnings.filterwarnings("ignore", message=".*use_cache=True.*gradient checkpointing.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
