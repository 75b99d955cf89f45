"""LayerDesk headless core: catalog, services, tasks and the layerctl CLI.

Nothing under ``app`` may import Qt; the console in ``ui`` renders what these services expose.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerdesk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
