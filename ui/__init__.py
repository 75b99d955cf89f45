"""The LayerDesk console (PySide6 + qasync). The only package that imports Qt; it calls app.services."""
