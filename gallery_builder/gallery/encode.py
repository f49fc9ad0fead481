"""Phase 1 of a gallery build: images -> the N gallery models -> raw parts, and the fusion of
raw embeddings through the heads into gallery vectors + uncertainties.

Each input range of ``shard_size`` items goes through the ensemble and becomes one part of the
raw store (:mod:`gallery_builder.gallery.raw_store`): the expensive, resumable part of a build.
The local engine runs here; :func:`encode` hands ``engine="ray"`` to
:mod:`gallery_builder.gallery.ray_engine`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gallery_builder.data.sources import GalleryItem, ItemSource
from gallery_builder.gallery.raw_store import Part, part_path, write_part
from gallery_builder.models import load_model
from gallery_builder.models.checkpoint import CheckpointError
from gallery_builder.models.saving import Trust
from gallery_builder.training.fit import embed
from gallery_builder.training.heads import (
    QUERY_MEMBER,
    HeadSet,
    check_gallery_models,
    load_heads,
)
from query_sdk.spec import InputSpec

log = logging.getLogger(__name__)

__all__ = [
    "Ensemble",
    "decode_items",
    "assemble_part",
    "fuse_parts",
    "split_ranges",
    "encode_parts",
    "encode",
]


class Ensemble:
    """The gallery models and their heads: images -> raw embeddings -> vectors + uncertainty."""

    def __init__(self, model_dirs: list[Path], heads_dir: Path, trust: Trust = ()) -> None:
        """``trust``: the entry points and folders whose code may run (see ``load_model``)."""
        self.model_dirs = [Path(d).resolve() for d in model_dirs]
        self.heads_dir = Path(heads_dir).resolve()
        self.trust = tuple(str(t) for t in trust)
        self.models = {d.name: load_model(d, self.trust) for d in self.model_dirs}
        self.dirs = {d.name: d for d in self.model_dirs}
        self.heads, self.heads_config = load_heads(self.heads_dir)
        if self.heads.identity:  # the query model, whatever its folder's name, is that member
            query_fp = self.heads_config["query_fingerprint"]
            member = {
                n: QUERY_MEMBER if c["fingerprint"] == query_fp else n
                for n, (_, c) in self.models.items()
            }
            self.models = {member[n]: v for n, v in self.models.items()}
            self.dirs = {member[n]: d for n, d in self.dirs.items()}
        missing = set(self.heads.inputs) - set(self.models)
        if missing:
            raise CheckpointError(
                f"the heads in {heads_dir} need gallery models {sorted(self.heads.inputs)}; "
                f"missing {sorted(missing)} (models are named by their folder; "
                f"{QUERY_MEMBER!r} is the query model the heads belong to)"
            )
        check_gallery_models(self.heads_config, {n: c for n, (_, c) in self.models.items()})

    @property
    def names(self) -> list[str]:
        """The models that run: every member whose model was given (the weighted ones are
        checked to be; those of weight 0 are stored raw for a later ``reproject``)."""
        return [n for n in self.heads.members if n in self.models]

    @property
    def specs(self) -> dict[str, InputSpec]:
        return {n: self.models[n][0].input_spec for n in self.names}

    def encode_raw(self, source: ItemSource, items: list[GalleryItem]) -> Part:
        """Run every gallery model on ``items``; unusable items come back as skipped."""
        images, reasons = decode_items(source, items, set(self.specs.values()))
        raw = {n: embed(self.models[n][0], images[spec]).numpy() for n, spec in self.specs.items()}
        return assemble_part(items, raw, reasons)

    def job_identity(self) -> dict:
        return {
            "models": {n: c["fingerprint"] for n, (_, c) in self.models.items()},
            "heads": self.heads_config["fingerprint"],
        }


def decode_items(
    source: ItemSource, items: list[GalleryItem], specs: set[InputSpec]
) -> tuple[dict[InputSpec, np.ndarray], list[str]]:
    """Decode ``items`` for every input spec, aligned with ``items``.

    An item that fails for any spec gets a reason (and zero pixels everywhere); "" means ok.
    """
    reasons = [""] * len(items)
    row = {item.position: r for r, item in enumerate(items)}
    out = {}
    for spec in specs:
        images, bad = source.decode(items, spec)
        for item, reason in bad:
            reasons[row[item.position]] = reasons[row[item.position]] or reason
        bad_rows = {row[item.position] for item, _ in bad}
        full = np.zeros((len(items), *spec.shape), np.uint8)
        full[[r for r in range(len(items)) if r not in bad_rows]] = images
        out[spec] = full
    return out, reasons


def assemble_part(items: list[GalleryItem], raw: dict[str, np.ndarray], reasons: list[str]) -> Part:
    """Keep the items that decoded and whose embeddings are finite in every model."""
    reasons = list(reasons)
    for name, values in raw.items():
        for r in np.flatnonzero(~np.isfinite(values).all(axis=1)):
            reasons[r] = reasons[r] or f"non-finite embedding from gallery model {name}"
    keep = np.array([not r for r in reasons], bool)
    kept = [i for i, ok in zip(items, keep, strict=True) if ok]
    return Part(
        positions=np.array([i.position for i in kept], np.int64),
        ids=[i.id for i in kept],
        classes=[i.class_name for i in kept],
        payload=[i.payload for i in kept],
        raw={n: np.asarray(v)[keep].astype(np.float16) for n, v in raw.items()},
        skipped=[
            {"position": i.position, "id": i.id, "reason": r}
            for i, r in zip(items, reasons, strict=True)
            if r
        ],
    )


def fuse_parts(
    heads: HeadSet, parts: dict[int, Part], live: dict[int, np.ndarray]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Gallery vectors (float32, normalised) and uncertainties of raw parts, per part number.
    Heads that average over neighbours see the ``live`` items of all parts at once (the
    others get zero vectors); otherwise each part is fused on its own."""
    if missing := sorted({n for p in parts.values() for n in heads.inputs if n not in p.raw}):
        raise CheckpointError(
            f"the heads fuse {missing}, whose raw embeddings the gallery did not store (their "
            "weight was 0 when it was built and their models were not given); build it again"
        )

    def raw_of(rows: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            n: torch.from_numpy(
                np.concatenate([parts[k].raw[n][r] for k, r in rows.items()]).astype(np.float32)
            )
            for n in heads.inputs
        }

    if not heads.neighbours:
        out = {}
        for k, part in parts.items():
            if len(part) == 0:
                out[k] = np.zeros((0, heads.dim), np.float32), np.zeros(0, np.float32)
                continue
            vectors, unc = heads.encode_gallery(raw_of({k: slice(None)}))
            out[k] = vectors.numpy().astype(np.float32), unc.numpy().astype(np.float32)
        return out
    rows = {k: np.flatnonzero(live[k]) for k in parts}
    out = {
        k: (np.zeros((len(p), heads.dim), np.float32), np.zeros(len(p), np.float32))
        for k, p in parts.items()
    }
    if sum(len(r) for r in rows.values()):
        vectors, unc = heads.gallery_vectors(raw_of(rows))
        start = 0
        for k, r in rows.items():
            out[k][0][r] = vectors[start : start + len(r)].numpy()
            out[k][1][r] = unc[start : start + len(r)].numpy()
            start += len(r)
    return out


# ----------------------------------------------------------------------------- phase 1: encode
def split_ranges(
    items: list[GalleryItem], size: int, first: int
) -> list[tuple[int, list[GalleryItem]]]:
    """Consecutive ranges of ``size`` items, numbered from ``first`` (one raw part each)."""
    return [(first + k, items[s : s + size]) for k, s in enumerate(range(0, len(items), size))]


def encode_parts(
    ensemble: Ensemble,
    source: ItemSource,
    gallery: Path,
    ranges: list[tuple[int, list[GalleryItem]]],
    batch_size: int,
    resume: bool,
) -> None:
    """Phase 1 on this machine: one raw part per range (finished parts are kept on resume)."""
    todo = [(k, items) for k, items in ranges if not (resume and part_path(gallery, k).is_file())]
    if len(todo) < len(ranges):
        log.info("resuming: %d of %d parts already encoded", len(ranges) - len(todo), len(ranges))
    with tqdm(total=sum(len(items) for _, items in todo), desc="encode", unit="img") as bar:
        for k, items in todo:
            parts = []
            for s in range(0, len(items), batch_size):
                parts.append(ensemble.encode_raw(source, items[s : s + batch_size]))
                bar.update(len(items[s : s + batch_size]))
            write_part(part_path(gallery, k), _concat(parts, ensemble.names))


def _concat(parts: list[Part], names: list[str]) -> Part:
    return Part(
        positions=np.concatenate([p.positions for p in parts]),
        ids=[i for p in parts for i in p.ids],
        classes=[c for p in parts for c in p.classes],
        payload=[x for p in parts for x in p.payload],
        raw={n: np.concatenate([p.raw[n] for p in parts]) for n in names},
        skipped=[s for p in parts for s in p.skipped],
    )


def encode(
    engine: str,
    ensemble: Ensemble,
    source: ItemSource,
    gallery: Path,
    ranges: list[tuple[int, list[GalleryItem]]],
    batch_size: int,
    resume: bool,
) -> None:
    """Phase 1 on the chosen engine: ``local`` (this process) or ``ray`` (Ray Data)."""
    if engine == "local":
        encode_parts(ensemble, source, gallery, ranges, batch_size, resume)
    elif engine == "ray":
        from gallery_builder.gallery.ray_engine import encode_parts_ray

        encode_parts_ray(ensemble, source, gallery, ranges, batch_size, resume)
    else:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
