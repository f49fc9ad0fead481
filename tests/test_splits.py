"""Class splits: nothing of a search or validation class reaches training, parts are disjoint,
seeded, shares respected; bad input gets one clear line; corrupt images are skipped and
listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gallery_builder.data.datasets import ImageSet
from gallery_builder.data.splits import (
    PARTS,
    SplitSettings,
    distractor_index,
    fingerprint,
    holdout_images,
    split_by_class,
    split_folders,
)
from gallery_builder.evaluation.experiment import load_config, load_splits, with_input_spec
from query_sdk.errors import DataError


def image_set(counts: dict[str, int], name: str = "root") -> ImageSet:
    """Images whose id names their class (``<class>/<i>.png``) and whose pixels hold their
    index, so that a test can check ids, labels and pixels travel together."""
    classes = sorted(counts)
    ids, labels = [], []
    for label, c in enumerate(classes):
        ids += [f"{c}/{i}.png" for i in range(counts[c])]
        labels += [label] * counts[c]
    images = (np.arange(len(ids)) % 256).astype(np.uint8)[:, None, None, None]
    return ImageSet(np.repeat(images, 4, 1), np.array(labels, np.int64), name, ids, classes)


def classes_of(part: ImageSet) -> set[str]:
    return {i.split("/")[0] for i in part.ids}


def assert_labels_name_classes(part: ImageSet) -> None:
    """Every label maps, through ``classes``, to the class folder of the image's id."""
    assert [part.classes[label] for label in part.labels] == [i.split("/")[0] for i in part.ids]


def test_split_by_class_never_leaks():
    data = image_set({f"c{k:02d}": 6 for k in range(20)})
    parts, record = split_by_class(data, SplitSettings())
    train, search = classes_of(parts["train"]), classes_of(parts["gallery"])
    val = classes_of(parts["val_gallery"])
    # by ids and by the record's class names
    assert classes_of(parts["query"]) == search and classes_of(parts["val_query"]) == val
    assert not train & search and not train & val and not val & search
    assert train | val | search == set(data.classes)
    assert set(record["classes"]["train"]) == train == set(parts["train"].classes)
    assert set(record["classes"]["val"]) == val and set(record["classes"]["search"]) == search
    # by labels: training labels are 0..C-1 over the training classes only
    labels = parts["train"].labels
    assert sorted(set(labels.tolist())) == list(range(len(train)))
    for p in PARTS:
        assert_labels_name_classes(parts[p])
    # disjoint by id, and together every image exactly once
    ids = [i for p in PARTS for i in parts[p].ids]
    assert len(ids) == len(set(ids)) == len(data)
    # pixels travelled with their ids
    index = {i: k for k, i in enumerate(data.ids)}
    for p in PARTS:
        expected = [data.images[index[i], 0, 0, 0] for i in parts[p].ids]
        assert parts[p].images[:, 0, 0, 0].tolist() == expected
    # shares: half the classes searched, 20% of the other 10 validate, half of each class queried
    assert len(search) == 10 and len(val) == 2 and len(train) == 8
    assert len(parts["query"]) == len(parts["gallery"]) == 30
    assert record["images"] == {p: len(parts[p]) for p in PARTS}


def test_split_is_seeded_and_named_by_its_ids():
    data = image_set({f"c{k:02d}": 4 for k in range(12)})
    a, ra = split_by_class(data, SplitSettings(seed=3))
    b, rb = split_by_class(data, SplitSettings(seed=3))
    c, rc = split_by_class(data, SplitSettings(seed=4))
    assert ra == rb and all(a[p].ids == b[p].ids for p in PARTS)
    assert rc["classes"] != ra["classes"]
    for p in PARTS:
        assert a[p].name == f"root:{p}-{fingerprint(a[p].ids)}"
    assert a["train"].name != c["train"].name  # a model cache cannot outlive its split


@pytest.mark.parametrize(
    ("counts", "settings", "expect"),
    [
        # (classes, images each), shares -> (search, val, train classes, queries per class)
        ((20, 8), SplitSettings(search_share=0.3, val_share=0.5, query_share=0.25), (6, 7, 7, 2)),
        ((5, 3), SplitSettings(), (2, 1, 2, 2)),  # the floors: 2 searched, 1 validates, 2 train
        ((9, 2), SplitSettings(search_share=0.9), (6, 1, 2, 1)),  # 3 classes stay for training
        ((40, 4), SplitSettings(val_share=0.01), (20, 2, 18, 2)),  # >= 6 training: 2 validate
    ],
)
def test_shares_and_floors(counts, settings, expect):
    n_classes, per_class = counts
    parts, record = split_by_class(
        image_set({f"c{k}": per_class for k in range(n_classes)}), settings
    )
    got = [len(record["classes"][r]) for r in ("search", "val", "train")]
    first = record["classes"]["search"][0]
    queries = sum(i.startswith(f"{first}/") for i in parts["query"].ids)
    assert (*got, queries) == expect


def test_too_few_classes_or_images_is_one_clear_line():
    with pytest.raises(
        DataError, match=r"root: 1 class\(es\) \(only\); a split by class needs at least 5"
    ):
        split_by_class(image_set({"only": 10}), SplitSettings())
    counts = {f"c{k}": 5 for k in range(6)} | {"one": 1}
    with pytest.raises(DataError, match=r"1 class\(es\) with fewer than 2 images: one \(1\);"):
        split_by_class(image_set(counts), SplitSettings())
    counts = {f"c{k}": 5 for k in range(6)} | {f"z{k}": 1 for k in range(7)}
    with pytest.raises(
        DataError,
        match=r"7 class\(es\).*z0 \(1\), z1 \(1\), z2 \(1\), z3 \(1\), z4 \(1\) and 2 more",
    ):
        split_by_class(image_set(counts), SplitSettings())


def test_explicit_folders():
    train = image_set({f"t{k}": 4 for k in range(8)}, "train")
    gallery = image_set({"a": 3, "b": 2, "distractor": 2}, "gallery")
    query = image_set({"a": 2, "b": 1}, "query")
    parts, record = split_folders(train, gallery, query, SplitSettings(seed=1))
    val = set(record["classes"]["val"])
    assert len(val) == 2 and val <= set(train.classes)  # drawn from the training classes
    assert not val & classes_of(parts["train"])
    assert parts["gallery"].ids == gallery.ids and parts["query"].ids == query.ids
    assert parts["gallery"].classes == parts["query"].classes == ["a", "b", "distractor"]
    for p in PARTS:
        assert_labels_name_classes(parts[p])
    leaky = image_set({**{f"t{k}": 4 for k in range(8)}, "b": 3}, "train")
    with pytest.raises(
        DataError, match=r"train: 1 training class\(es\) are also gallery/query classes: b;"
    ):
        split_folders(leaky, gallery, query, SplitSettings())
    lonely = image_set({"a": 1, "c": 2}, "query")
    with pytest.raises(
        DataError, match=r"query: 1 query class\(es\) have no gallery images in gallery: c;"
    ):
        split_folders(train, gallery, lonely, SplitSettings())


def test_closed_set_holdout():
    data = image_set({f"c{k}": 50 for k in range(4)})
    train, vg, vq = holdout_images(data, 0.1, seed=0)
    assert (len(train), len(vg), len(vq)) == (180, 10, 10)
    assert not set(train.ids) & set(vg.ids) and not set(vg.ids) & set(vq.ids)
    assert train.classes == vg.classes == data.classes  # closed set: same classes, same labels
    for part in (train, vg, vq):
        assert_labels_name_classes(part)


def write_folder(root: Path, counts: dict[str, int], size=(12, 10), odd: int = 0) -> None:
    """PNG class folders; the first ``odd`` images of each class are 20x20 grey."""
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            if i < odd:
                Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
                    root / c / f"{i}.png"
                )
            else:
                pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_folder_spec_from_the_images_and_corrupt_files_listed(tmp_path):
    root = tmp_path / "photos"
    write_folder(root, {f"k{k}": 4 for k in range(6)}, odd=1)
    (root / "k3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg = with_input_spec(load_config(data=root))
    # the most common size and channels (12x10 RGB; the 20x20 grey ones are resized)
    assert cfg.spec.shape == (12, 10, 3)
    splits = load_splits(cfg)
    train = splits.train.images.reshape(-1, 3) / 255.0
    assert np.allclose(cfg.spec.mean, train.mean(0), atol=2e-3)
    assert splits.split["skipped"]["count"] == 1
    assert splits.split["skipped"]["files"][0][0] == "k3/broken.png"
    assert "1 unreadable image file(s) skipped: k3/broken.png" in splits.protocol
    assert sum(len(getattr(splits, p)) for p in PARTS) == 24  # the run goes on without it
    assert splits.open_set and splits.split["images"]["train"] == len(splits.train)


def test_limits_keep_training_labels_contiguous(tmp_path):
    root = tmp_path / "many"
    write_folder(root, {f"k{k:02d}": 3 for k in range(30)})
    cfg = with_input_spec(load_config(data=root, train_limit=5))
    splits = load_splits(cfg)
    assert len(splits.train) == 5
    assert sorted(set(splits.train.labels.tolist())) == list(range(len(splits.train.classes)))
    assert_labels_name_classes(splits.train)
    assert splits.train.name.endswith(fingerprint(splits.train.ids))


# --------------------------------------------------------------------------- distractors
def test_distractors_spread_evenly_over_the_classes_and_are_seeded():
    labels = np.repeat(np.arange(4), [50, 3, 10, 10])
    picked = distractor_index(labels, 13, seed=2)
    assert picked.tolist() == sorted(set(picked.tolist())) and len(picked) == 13
    # every class gives its j-th image before any gives its (j+1)-th: 3 + 3 + 3 + 3 + 1
    assert sorted(np.bincount(labels[picked]).tolist()) == [3, 3, 3, 4]
    assert distractor_index(labels, 13, 2).tolist() == picked.tolist()
    assert distractor_index(labels, 13, 3).tolist() != picked.tolist()
    assert distractor_index(labels, 1000, 2).tolist() == list(range(len(labels)))
    assert len(distractor_index(labels, 0, 2)) == 0


def test_validation_distractors_are_training_images_no_query_matches(tmp_path):
    from gallery_builder.evaluation.run import _Scorer

    root = tmp_path / "many"
    write_folder(root, {f"k{k:02d}": 6 for k in range(20)})
    splits = load_splits(with_input_spec(load_config(data=root)))
    d = splits.val_distractors
    # by default as many as make the validation gallery as large as the search gallery
    assert len(d) == len(splits.gallery) - len(splits.val_gallery) > 0
    train = set(splits.split["classes"]["train"])
    picked = [splits.train.ids[i] for i in d]
    assert {i.split("/")[0] for i in picked} <= train  # by ids: training images only
    held_out = {i for p in PARTS[1:] for i in getattr(splits, p).ids}
    assert not set(picked) & held_out
    assert [splits.train.classes[c] for c in splits.train.labels[d]] == [
        i.split("/")[0] for i in picked
    ]
    # by labels: past every validation label, so that no validation query matches one
    labels = _Scorer(splits).labels
    padded, queries = labels["val_gallery"], labels["val_query"]
    assert len(padded) == len(splits.val_gallery) + len(d)
    assert padded[: len(splits.val_gallery)].tolist() == splits.val_gallery.labels.tolist()
    assert int(padded[len(splits.val_gallery) :].min()) > int(queries.max())
    assert splits.split["val_distractors"] == {
        "images": len(d),
        "classes": len(set(picked) and {i.split("/")[0] for i in picked}),
    }
    assert f"joined by {len(d)} training images" in splits.protocol
    # a count of the user's, or none
    few = load_splits(with_input_spec(load_config(data=root, split=SplitSettings(distractors=3))))
    assert len(few.val_distractors) == 3
    none = load_splits(with_input_spec(load_config(data=root, split=SplitSettings(distractors=0))))
    assert len(none.val_distractors) == 0 and "as distractors" not in none.protocol
