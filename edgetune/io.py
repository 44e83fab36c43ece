"""Small file-system contracts shared by every stage."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgetune.errors import UserError


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out`` only if the block succeeds.

    On any exception the scratch directory is removed, so a failed stage never leaves a
    half-written output behind. ``out`` must not exist unless ``overwrite`` is set.
    """
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)
