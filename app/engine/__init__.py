"""The compositing engine: layer repository, import, compose, registry merge, disk images.

Heavy engine work runs inside tasks (often in a child process); nothing here touches the catalog.
"""
