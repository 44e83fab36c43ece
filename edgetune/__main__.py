"""``python -m edgetune``: the command line, so that ``accelerate launch -m edgetune train RECIPE`` works."""

from edgetune.cli import app

app()
