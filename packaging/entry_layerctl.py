"""The frozen command line's entry point: ``layerctl`` (also how the frozen build starts its own
child processes: ``layerctl --run-module app.tasks.worker``)."""

from app.cli.main import run

run()
