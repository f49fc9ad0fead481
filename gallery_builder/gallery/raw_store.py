"""The server-side raw store of a gallery: ``raw/part-NNNNN.npz``, one per shard.

A part holds, for the items of one input range, the N gallery models' raw embeddings (fp16),
the items' ids, positions, payloads and class names, and the inputs that were skipped. It is what
re-projection with new heads reads instead of running the gallery models again, and what
``--resume`` finds already done. Not downloaded by phones. npz without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from query_sdk.fileio import atomic_write
from query_sdk.gallery_format import GalleryError

__all__ = ["RAW_DIR", "Part", "part_path", "write_part", "read_part", "list_parts"]

RAW_DIR = "raw"


@dataclass
class Part:
    positions: np.ndarray  # int64: the items' positions (hnswlib labels)
    ids: list[str]
    payload: list[dict | None]
    raw: dict[str, np.ndarray]  # model name -> (n, d) float16
    skipped: list[dict]  # {"position", "id", "reason"}
    classes: list[str] = field(default_factory=list)  # per item, "" none; []: parts without

    def __len__(self) -> int:
        return len(self.positions)


def part_path(gallery: Path, number: int) -> Path:
    return Path(gallery) / RAW_DIR / f"part-{number:05d}.npz"


def list_parts(gallery: Path) -> list[int]:
    folder = Path(gallery) / RAW_DIR
    return (
        sorted(int(p.stem.split("-")[1]) for p in folder.glob("part-*.npz"))
        if folder.is_dir()
        else []
    )


def write_part(path: Path, part: Part) -> None:
    """Write atomically (:func:`query_sdk.fileio.atomic_write`: a new inode, umask modes), so a
    part hard-linked into a staged gallery is never changed under the live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "positions": np.asarray(part.positions, np.int64),
        "ids": np.asarray(part.ids, dtype=str) if part.ids else np.zeros(0, "<U1"),
        "classes": np.asarray(part.classes, dtype=str) if part.classes else np.zeros(0, "<U1"),
        "payload": np.asarray(
            [json.dumps(p) if p is not None else "" for p in part.payload], dtype=str
        )
        if part.payload
        else np.zeros(0, "<U1"),
        "skipped": np.asarray([json.dumps(s) for s in part.skipped], dtype=str)
        if part.skipped
        else np.zeros(0, "<U1"),
        **{f"raw.{name}": np.asarray(v, np.float16) for name, v in part.raw.items()},
    }
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def read_part(path: Path) -> Part:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Part(
                positions=z["positions"].astype(np.int64),
                ids=z["ids"].tolist(),
                payload=[json.loads(p) if p else None for p in z["payload"].tolist()],
                raw={k[4:]: z[k] for k in z.files if k.startswith("raw.")},
                skipped=[json.loads(s) for s in z["skipped"].tolist()],
                classes=z["classes"].tolist() if "classes" in z.files else [],
            )
    except (OSError, ValueError, KeyError) as e:
        raise GalleryError(
            f"{path}: unreadable raw part ({e}); rebuild the gallery, or restore the file"
        ) from e
