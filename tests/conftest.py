"""Shared fixtures: tiny random-weight models written to disk and loaded back with from_pretrained,
exactly as a user's local model directory would be."""

from __future__ import annotations

import pytest

from edgetune.families import FAMILIES


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llava")
    FAMILIES["llava"].build_tiny(out)
    return out
