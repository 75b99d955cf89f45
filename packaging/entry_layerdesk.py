"""The frozen console's entry point: ``layerdesk`` (a windowed program on Windows)."""

import sys

from ui.main import main

sys.exit(main())
