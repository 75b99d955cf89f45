"""``layerctl``: one module per command group, all calling :mod:`app.services`."""
