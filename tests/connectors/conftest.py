"""What the connector tests share: a published image on disk and its sidecar."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from app.connectors.base import ImageSidecar

MiB = 1024 * 1024
CREATED = datetime(2025, 3, 1, 10, 15, 0, tzinfo=UTC)


class Flag:
    """A cancel token the test sets (from a progress callback, to land mid-copy)."""

    def __init__(self) -> None:
        self.cancelled = False


def image_file(folder: Path, name: str = "Gold_2025-03-01_10-15.vhdx", size: int = 3 * MiB) -> Path:
    """A file standing in for a published image: distinct bytes, so a copy can be compared."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("wb") as file:
        block = bytes(range(256)) * 4096
        written = 0
        while written < size:
            file.write(block[: size - written])
            written += min(len(block), size - written)
    return path


def sidecar_for(image: Path, *, template: str = "Gold") -> ImageSidecar:
    import hashlib

    return ImageSidecar(
        image=image.stem, template=template, template_revision=3, format=image.suffix.lstrip("."),
        size_bytes=image.stat().st_size, checksum="sha256:" + hashlib.sha256(image.read_bytes()).hexdigest(),
        layers=({"role": "os", "layer": "Win11", "version": "1", "priority": None, "size_bytes": 10,
                 "checksum": "sha256:" + "a" * 64},
                {"role": "app", "layer": "Office", "version": "2024", "priority": 0, "size_bytes": 20,
                 "checksum": "sha256:" + "b" * 64}),
        created_at=CREATED, created_by="admin",
    )
