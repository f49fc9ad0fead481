"""Gallery inputs: what to index, with string ids and optional payloads, decoded lazily.

A source is an image folder (ids = paths relative to it), a list file with one
``path[,id[,payload-json]]`` per line (relative paths are relative to the list file), or a
built-in split such as ``fashion-mnist:train`` (ids ``fashion-mnist:train/<index>``). Each
item carries its class name (an image folder's class sub-folder, a built-in dataset's class; ""
in a list file), which the builder stores in the shard sidecar: ids are never parsed for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gallery_builder.data.datasets import (
    BUILTIN_SOURCES,
    DataError,
    decode_image,
    list_image_folder,
    load_source,
)
from gallery_builder.data.glyphs import FONT_SETS, glyphs_dir
from query_sdk.spec import InputSpec, to_model_input

__all__ = ["GalleryItem", "ItemSource", "open_source"]


@dataclass(frozen=True)
class GalleryItem:
    position: int  # order in the source; doubles as the hnswlib label
    id: str
    payload: dict | None = None
    path: str | None = None  # the file to decode; None for built-in arrays
    class_name: str = ""  # the item's class ("" for none)


class ItemSource:
    """The items of a source and how to turn them into model inputs."""

    def __init__(
        self, name: str, items: list[GalleryItem], arrays: np.ndarray | None = None, start: int = 0
    ):
        self.name, self.items, self._arrays, self._start = name, items, arrays, start
        if not items:
            raise DataError(f"{name}: no images to index")
        seen: dict[str, int] = {}
        duplicates = []
        for item in items:
            if item.id in seen:
                duplicates.append(item.id)
            seen[item.id] = item.position
        if duplicates:
            raise DataError(
                f"{name}: {len(duplicates)} duplicate ids, first: "
                f"{', '.join(repr(d) for d in duplicates[:5])}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def decode(
        self, items: list[GalleryItem], spec: InputSpec
    ) -> tuple[np.ndarray, list[tuple[GalleryItem, str]]]:
        """Images of ``items`` as the spec wants them; unusable ones are returned as skipped.

        Returns (images of the usable items, in order; skipped (item, reason) pairs).
        """
        if self._arrays is not None:
            rows = [i.position - self._start for i in items]
            return to_model_input(self._arrays[rows], spec), []
        images, skipped = [], []
        for item in items:
            try:
                images.append(decode_image(Path(item.path), spec))
            except Exception as e:  # any decoder failure: skip the file, keep going
                skipped.append((item, f"{item.path}: {type(e).__name__}: {e}"))
        stacked = np.stack(images) if images else np.empty((0, *spec.shape), np.uint8)
        return stacked, skipped


def open_source(source: str, start: int = 0) -> ItemSource:
    """List the items of a source; ``start`` offsets positions (for adding to a gallery)."""
    if source in FONT_SETS:  # the fetched root of a font set, an image folder
        source = str(glyphs_dir(source))
    path = Path(source).expanduser()
    if source in BUILTIN_SOURCES:
        data = load_source(source)
        items = [
            GalleryItem(start + i, f"{source}/{i}", class_name=data.classes[int(label)])
            for i, label in enumerate(data.labels)
        ]
        return ItemSource(source, items, data.images, start)
    if path.is_dir():
        files, classes = list_image_folder(path)
        return ItemSource(
            source,
            [
                GalleryItem(start + i, f.relative_to(path).as_posix(), None, str(f), classes[c])
                for i, (f, c) in enumerate(files)
            ],
        )
    if path.is_file():
        return ItemSource(source, _read_list(path, start))
    raise DataError(
        f"unknown gallery source {source!r}: an image folder, a list file "
        f"(path[,id[,payload-json]] per line) or one of {', '.join((*BUILTIN_SOURCES, *FONT_SETS))}"
    )


def _read_list(path: Path, start: int) -> list[GalleryItem]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(",", 2)
        file = Path(parts[0].strip()).expanduser()
        file = file if file.is_absolute() else path.parent / file
        item_id = parts[1].strip() if len(parts) > 1 and parts[1].strip() else parts[0].strip()
        payload = None
        if len(parts) > 2 and parts[2].strip():
            try:
                payload = json.loads(parts[2])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: payload is not valid JSON ({e})") from e
            if not isinstance(payload, dict):
                raise DataError(f"{path}:{number}: payload must be a JSON object")
        items.append(GalleryItem(start + len(items), item_id, payload, str(file)))
    return items
