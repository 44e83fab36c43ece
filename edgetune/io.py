"""Small file-system contracts shared by every stage.

Outputs appear whole or not at all (``atomic_output_dir``), carry the user's usual permissions
(the umask, as a plain ``mkdir`` would give), and an existing directory is replaced only with
``--overwrite`` and only when edgetune wrote it (``written_by_edgetune``): a user's own folder is
never deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgetune.errors import UserError

# Files that only edgetune's outputs hold: a bundle's manifest, a merged model's provenance, a
# run's final summary; an unfinished run directory holds a recipe beside its metrics log.
OUTPUT_MARKERS = ("manifest.json", "edgetune.json", "run.json")
RUN_MARKERS = ("recipe.yaml", "metrics.jsonl")


def written_by_edgetune(path: Path) -> bool:
    names = {p.name for p in Path(path).iterdir()}
    return any(m in names for m in OUTPUT_MARKERS) or set(RUN_MARKERS) <= names


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Raise a UserError unless ``out`` may become a new output: absent, empty, or (with
    ``overwrite``) a directory edgetune wrote."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another --out or remove it (--overwrite replaces an edgetune output)")
    if not written_by_edgetune(out):
        raise UserError(f"{out} was not written by edgetune; --overwrite only replaces edgetune's outputs, so remove it yourself or choose another --out")


def user_mode(kind: str = "dir") -> int:
    """The permission bits a new directory (or file) gets from the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out`` only if the block succeeds.

    On any exception the scratch directory is removed, so a failed stage never leaves a
    half-written output behind. ``out`` must be absent or empty, or with ``overwrite`` a directory
    edgetune wrote (see check_output_dir). The result has the permissions of a plain ``mkdir``
    (``tempfile.mkdtemp`` makes its directory 0700, which a rename would keep).
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        scratch.chmod(user_mode())
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a crash)
    sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
