"""Class splits for the reference experiment.

Open set (:func:`split_by_class`, :func:`split_folders`): the classes are split, not the
images. Training classes train every model and head; a share of them, the validation classes,
is held out of all training (model selection and fusion weights are fitted on them); the search
classes are never seen by any training. The images of each validation and search class are
split into gallery and queries. The validation gallery also holds distractors
(:func:`distractor_index`): training images, of classes no validation query has, so that a
choice made on a few validation classes faces a gallery as crowded as the search one. Closed
set (:func:`holdout_images`): a share of the training images is held out as a validation
gallery and validation queries of the same classes.

Every part is an :class:`ImageSet` whose ``name`` ends with a fingerprint of its ids, so that a
model cached for one split is never reused for another. Training labels run 0..C-1 over the
training classes; in the other parts a label indexes that part's ``classes`` (shared by a
gallery and its queries).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gallery_builder.data.datasets import ImageSet
from query_sdk.errors import DataError

__all__ = [
    "PARTS",
    "SplitSettings",
    "fingerprint",
    "preview",
    "split_by_class",
    "split_folders",
    "holdout_images",
    "distractor_index",
]

#: The parts of every split, in this order.
PARTS = ("train", "val_gallery", "val_query", "gallery", "query")
#: Class names shown before "and N more" in messages and protocols.
PREVIEW = 5


@dataclass
class SplitSettings:
    """Shares of a split. ``search_share``: of the classes, the search classes (open set);
    ``val_share``: of the training classes (open set) or training images (closed set), the
    validation ones; ``query_share``: of each validation or search class's images, the
    queries; ``seed``: the split's random seed; ``distractors``: training images added to the
    validation gallery (open set), None for as many as make it as large as the search
    gallery, 0 for none."""

    search_share: float = 0.5
    val_share: float = 0.2
    query_share: float = 0.5
    seed: int = 0
    distractors: int | None = None

    def __post_init__(self) -> None:
        for name in ("search_share", "val_share", "query_share"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if self.distractors is not None and self.distractors < 0:
            raise ValueError(f"distractors must be at least 0 (or unset), got {self.distractors}")


def fingerprint(ids: Sequence[str]) -> str:
    """12 hex digits of the sha256 of the sorted ids: names a set of images."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:12]


def preview(names: Sequence[str], k: int = PREVIEW) -> str:
    """``a, b, c`` or, for more than ``k`` names, the first ``k`` and ``and N more``."""
    names = list(names)
    shown = ", ".join(names[:k])
    return shown if len(names) <= k else f"{shown} and {len(names) - k} more"


def _counts(data: ImageSet) -> dict[str, int]:
    """Images per class name, every class of ``data.classes`` included (0 if none left)."""
    counts = Counter(data.labels.tolist())
    return {name: counts.get(i, 0) for i, name in enumerate(data.classes)}


def _part(
    data: ImageSet, names: Sequence[str], index: np.ndarray, part: str, base: str
) -> ImageSet:
    """The images at ``index``, relabelled onto ``names`` (sorted); named with a fingerprint."""
    names = sorted(names)
    remap = np.full(len(data.classes), -1, dtype=np.int64)
    for i, name in enumerate(names):
        if name in data.classes:
            remap[data.classes.index(name)] = i
    sub = data.subset(np.sort(index))
    sub.labels = remap[sub.labels]
    if (sub.labels < 0).any():
        raise AssertionError(f"{part}: an image outside the part's classes")  # a bug, not input
    sub.classes = names
    sub.name = f"{base}:{part}-{fingerprint(sub.ids)}"
    return sub


def _class_index(data: ImageSet, names: Sequence[str]) -> np.ndarray:
    wanted = np.isin(data.labels, [data.classes.index(n) for n in names])
    return np.flatnonzero(wanted)


def _few_images(counts: dict[str, int], names: Sequence[str], where: str) -> None:
    """DataError when a class of ``names`` has fewer than 2 images (a gallery image and a
    query)."""
    few = [n for n in names if counts[n] < 2]
    if few:
        listed = preview([f"{n} ({counts[n]})" for n in few])
        raise DataError(
            f"{where}: {len(few)} class(es) with fewer than 2 images: {listed}; any class may "
            "be searched or validated and then needs a gallery image and a query (add images "
            "or remove the class)"
        )


def _gallery_query(
    data: ImageSet, names: Sequence[str], share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each class's images split into gallery and queries (``share`` queries, at least one of
    each)."""
    gallery, query = [], []
    for name in sorted(names):
        index = rng.permutation(_class_index(data, [name]))
        n_query = min(max(1, round(share * len(index))), len(index) - 1)
        query.append(index[:n_query])
        gallery.append(index[n_query:])
    return np.concatenate(gallery), np.concatenate(query)


def _n_val(n_train: int, share: float) -> int:
    """Validation classes among ``n_train`` training classes: ``share`` of them, at least 2
    when there are 6 or more, else at least 1; at least 2 stay for training."""
    return min(max(2 if n_train >= 6 else 1, round(share * n_train)), n_train - 2)


def _open_set(
    train_src: ImageSet,
    train_names: list[str],
    val_names: list[str],
    gallery: ImageSet,
    query: ImageSet,
    s: SplitSettings,
    rng: np.random.Generator,
) -> tuple[dict[str, ImageSet], dict]:
    """The five parts and the JSON-able record of an open-set split."""
    vg, vq = _gallery_query(train_src, val_names, s.query_share, rng)
    base = train_src.name
    parts = {
        "train": _part(train_src, train_names, _class_index(train_src, train_names), "train", base),
        "val_gallery": _part(train_src, val_names, vg, "val_gallery", base),
        "val_query": _part(train_src, val_names, vq, "val_query", base),
        "gallery": gallery,
        "query": query,
    }
    record = {
        "seed": s.seed,
        "open_set": True,
        "classes": {
            "train": sorted(train_names),
            "val": sorted(val_names),
            "search": list(gallery.classes),
        },
        "images": {p: len(v) for p, v in parts.items()},
        "fingerprints": {p: v.name.rsplit("-", 1)[1] for p, v in parts.items()},
    }
    return parts, record


def split_by_class(data: ImageSet, s: SplitSettings) -> tuple[dict[str, ImageSet], dict]:
    """One class-folder root split by class (seeded): ``(parts, record)``.

    ``search_share`` of the classes are search classes (at least 2, and at least 3 stay for
    training so that validation classes can be held out of them); every class needs 2 images,
    since any class may become a search or validation class.
    """
    counts = _counts(data)
    names = sorted(counts)
    if len(names) < 5:
        raise DataError(
            f"{data.name}: {len(names)} class(es) ({preview(names)}); a split by class needs at "
            "least 5: 2 to train, 1 to validate, 2 to search (one sub-folder per class)"
        )
    _few_images(counts, names, data.name)
    rng = np.random.default_rng(s.seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n_search = min(max(2, round(s.search_share * len(names))), len(names) - 3)
    search, train_all = order[:n_search], order[n_search:]
    n_val = _n_val(len(train_all), s.val_share)
    val, train = train_all[:n_val], train_all[n_val:]
    g, q = _gallery_query(data, search, s.query_share, rng)
    gallery = _part(data, search, g, "gallery", data.name)
    query = _part(data, search, q, "query", data.name)
    return _open_set(data, train, val, gallery, query, s, rng)


def split_folders(
    train: ImageSet, gallery: ImageSet, query: ImageSet, s: SplitSettings
) -> tuple[dict[str, ImageSet], dict]:
    """Explicit folders: ``(parts, record)``. Gallery and query share class names (a gallery
    class without queries is a distractor), training classes must not overlap them;
    validation classes are drawn (seeded) from the training classes with 2 or more images."""
    train_counts, g_counts, q_counts = _counts(train), _counts(gallery), _counts(query)
    searched = {n for counts in (g_counts, q_counts) for n, c in counts.items() if c}
    overlap = sorted(searched & {n for n, c in train_counts.items() if c})
    if overlap:
        raise DataError(
            f"{train.name}: {len(overlap)} training class(es) are also gallery/query classes: "
            f"{preview(overlap)}; the search classes must be unseen in training (remove them "
            "from the training folder)"
        )
    no_gallery = sorted(n for n, c in q_counts.items() if c and not g_counts.get(n))
    if no_gallery:
        raise DataError(
            f"{query.name}: {len(no_gallery)} query class(es) have no gallery images in "
            f"{gallery.name}: {preview(no_gallery)}; a query needs its class in the gallery"
        )
    present = sorted(n for n, c in train_counts.items() if c)
    eligible = [n for n in present if train_counts[n] >= 2]
    n_val = _n_val(len(present), s.val_share) if len(present) >= 3 else 1
    if len(present) < 3 or len(eligible) < n_val:
        raise DataError(
            f"{train.name}: {len(present)} training class(es), {len(eligible)} with 2 or more "
            f"images; at least 3 classes are needed, {n_val} of them with 2 or more images "
            "(validation classes need a gallery image and a query)"
        )
    rng = np.random.default_rng(s.seed)
    val = sorted(eligible[i] for i in rng.permutation(len(eligible))[:n_val])
    train_names = [n for n in present if n not in val]
    search = sorted(n for n, c in g_counts.items() if c)
    g_part = _part(gallery, search, np.arange(len(gallery)), "gallery", gallery.name)
    q_part = _part(query, search, np.arange(len(query)), "query", query.name)
    return _open_set(train, train_names, val, g_part, q_part, s, rng)


def holdout_images(train: ImageSet, share: float, seed: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Closed set: ``share`` of the training images (seeded) held out, half as a validation
    gallery and half as validation queries; returns (train, val_gallery, val_query)."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(2, round(share * len(train)))
    n_gallery = n_val - n_val // 2
    index = {
        "train": order[n_val:],
        "val_gallery": order[:n_gallery],
        "val_query": order[n_gallery:n_val],
    }
    return tuple(_part(train, train.classes, index[p], p, train.name) for p in index)


def distractor_index(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` training images (all of them if fewer), spread evenly over
    the classes of ``labels``: every class gives its j-th image (seeded order) before any
    gives its (j+1)-th, so a few large classes cannot fill the sample."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # an image's place within its class
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((rng.random(len(labels)), rank))[: max(0, n)])
