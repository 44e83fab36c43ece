"""What a PEFT method must provide: attach to a frozen backbone, save/load its artifact, merge.

A method is one file plus one line in ``edgetune.methods.METHODS``. ``options`` lists the
``method.*`` recipe keys it reads besides ``name`` and ``train_connector``; any other key set in a
recipe is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.families import ModelFamily
from edgetune.recipe import MethodSection


class PeftMethod:
    name: str
    options: frozenset[str] = frozenset()
    mergeable: bool = True  # False: the method lives on inside the exported decoder graph

    def attach(self, model: Any, family: ModelFamily, config: MethodSection) -> Any:
        """Wrap the frozen model; only the method's parameters (and the connector if
        ``config.train_connector``) require grad afterwards."""
        raise NotImplementedError

    def save(self, model: Any, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, model: Any, adapter_dir: Path) -> Any:
        """Re-attach a saved artifact to a freshly loaded backbone; outputs equal the trained model's."""
        raise NotImplementedError

    def merge(self, model: Any) -> Any:
        """Fold the method into full-precision base weights; returns a plain transformers model."""
        raise NotImplementedError
