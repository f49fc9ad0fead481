"""Phase 1 of a gallery build on Ray Data: the same parts as the local engine, beyond one
machine.

Ray Data reads the item list, decodes images in tasks, runs each gallery model in its own
actor pool (``map_batches`` with a callable class), and writes each raw part in one task
(``groupby("part").map_groups``). ``ray.init()`` joins the cluster in ``RAY_ADDRESS`` when it
is set, else starts a local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gallery_builder.data.sources import GalleryItem, ItemSource
from gallery_builder.gallery.raw_store import part_path, write_part

__all__ = ["encode_parts_ray"]


class _ModelActor:
    """One gallery model, loaded once per actor."""

    def __init__(
        self, model_dir: str, column: str, image_column: str, trust: tuple[str, ...]
    ) -> None:
        import torch

        from gallery_builder.models import load_model

        torch.set_num_threads(1)
        self.model, _ = load_model(Path(model_dir), trust)
        self.column, self.image_column = column, image_column

    def __call__(self, batch: dict) -> dict:
        from gallery_builder.training.fit import embed

        batch[self.column] = embed(self.model, batch[self.image_column]).numpy()
        return batch


def _decode(batch: dict, source: ItemSource, specs: dict) -> dict:
    from gallery_builder.gallery.encode import decode_items

    items = [source.items[i] for i in batch["row"]]
    images, reasons = decode_items(source, items, set(specs.values()))
    for key, spec in specs.items():
        batch[key] = images[spec]
    batch["reason"] = np.array(reasons, dtype=object)
    return batch


def _write(group: dict, source: ItemSource, gallery: str, names: list[str]) -> dict:
    from gallery_builder.gallery.encode import assemble_part

    order = np.argsort(group["row"])
    items: list[GalleryItem] = [source.items[group["row"][i]] for i in order]
    raw = {n: np.stack(group[f"raw_{n}"])[order] for n in names}
    part = assemble_part(items, raw, [str(group["reason"][i]) for i in order])
    number = int(group["part"][0])
    write_part(part_path(Path(gallery), number), part)
    return {"part": np.array([number]), "items": np.array([len(part)])}


def encode_parts_ray(
    ensemble,
    source: ItemSource,
    gallery: Path,
    ranges: list[tuple[int, list[GalleryItem]]],
    batch_size: int,
    resume: bool,
    workers: int | None = None,
) -> None:
    """Encode the ranges not yet done into raw parts with Ray Data."""
    import ray

    todo = [(k, items) for k, items in ranges if not (resume and part_path(gallery, k).is_file())]
    if not todo:
        return
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False
        )
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    row_of = {item.position: r for r, item in enumerate(source.items)}
    records = [{"row": row_of[item.position], "part": k} for k, items in todo for item in items]
    spec_keys = {f"image_{i}": spec for i, spec in enumerate(set(ensemble.specs.values()))}
    key_of = {spec: key for key, spec in spec_keys.items()}
    # every model's actors hold half the cluster's CPUs at most, the decode and write tasks
    # the other half: actors that reserved every CPU would leave the tasks waiting forever
    stages = len(ensemble.specs)
    per_model = max(1, workers // (2 * stages))
    cpus = min(1.0, workers / (2 * per_model * stages))
    task_cpus = min(1.0, workers / 2)
    ds = ray.data.from_items(records).map_batches(
        _decode,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=task_cpus,
        fn_kwargs={"source": source, "specs": spec_keys},
    )
    for name, spec in ensemble.specs.items():
        model_dir = str(ensemble.dirs[name])
        ds = ds.map_batches(
            _ModelActor,
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=per_model,
            num_cpus=cpus,
            fn_constructor_kwargs={
                "model_dir": model_dir,
                "column": f"raw_{name}",
                "image_column": key_of[spec],
                "trust": ensemble.trust,
            },
        )
    ds = ds.groupby("part", num_partitions=len(todo)).map_groups(
        _write,
        batch_format="numpy",
        num_cpus=task_cpus,
        fn_kwargs={"source": source, "gallery": str(gallery), "names": ensemble.names},
    )
    written = ds.take_all()
    if sorted(int(r["part"]) for r in written) != sorted(k for k, _ in todo):
        raise RuntimeError(
            f"ray wrote parts {sorted(int(r['part']) for r in written)}, "
            f"expected {sorted(k for k, _ in todo)}"
        )
