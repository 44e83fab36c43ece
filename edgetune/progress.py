"""Console output shared by the stages: one rich console, progress bars, memory readings."""

from __future__ import annotations

import os
import resource
import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)
_debug = {"on": False}


def set_debug(on: bool) -> None:
    """--debug for this invocation: tracebacks on errors, and the libraries' own logs."""
    _debug["on"] = on


def debug_enabled() -> bool:
    return _debug["on"] or bool(os.environ.get("EDGETUNE_DEBUG"))


class PeakMemory:
    """Peak memory over a block: GPU memory allocated on CUDA, else the process's anonymous resident
    memory (what the process allocated itself: tensors, activations, optimizer state), sampled every
    20 ms. The resident set would also count pages of files that are merely mapped, such as
    safetensors shards after loading (8.4 of 13 GiB at the Qwen2-VL-2B shape), which the kernel can
    drop at will; and the process-lifetime peak, ru_maxrss, would carry one run's peak into the next
    when several runs share a process, as in a sweep."""

    def __init__(self, device_type: str = "cpu"):
        self.cuda = device_type == "cuda"
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = current_anon_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, current_anon_bytes())

    @property
    def mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return max(self.peak_bytes, current_anon_bytes()) / 2**20

    def __exit__(self, *exc) -> None:
        self._stop.set()


def current_anon_bytes() -> int:
    """The process's anonymous resident memory in bytes (RssAnon in /proc/self/status), on Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # not Linux: the lifetime peak of the resident set, the closest reading there is
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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
