"""``python -m app.cli``: layerctl, for child processes started by layerctl itself."""

from app.cli.main import run

run()
