"""Training a run's models in parallel worker processes.

Small models on small images keep the threads of one process only partly busy: on a 2-core
CPU two 1-thread processes trained 1.2-1.4x the models per second of one 2-thread process
(widecnn 1.37x, mobilenet 1.17x). So a run trains ``workers`` models at a time, each process on
its share of torch's threads: the gallery, diversity and query models at once, each distilled
baseline as soon as its teacher is done. Workers only fill the model cache; the run then loads
every model from it. Each model is seeded, so the order in which they finish does not matter
(its numbers depend on its process's thread count, as any float reduction does).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gallery_builder.data.datasets import ImageSet
from gallery_builder.evaluation.experiment import (
    ExperimentConfig,
    ModelSpec,
    cached_models,
    get_distilled,
    get_model,
)

log = logging.getLogger(__name__)

__all__ = ["MAX_AUTO_WORKERS", "worker_count", "train_models"]

#: The most worker processes ``workers = 0`` (automatic) starts: each holds the training images.
MAX_AUTO_WORKERS = 4

_worker: dict = {}  # a worker process's experiment, training images and model cache folder


def worker_count(cfg: ExperimentConfig) -> int:
    """``cfg.workers``, or one per torch thread (CPU core) up to :data:`MAX_AUTO_WORKERS`."""
    return cfg.workers or max(1, min(MAX_AUTO_WORKERS, torch.get_num_threads()))


def train_models(cfg: ExperimentConfig, train: ImageSet, models_dir: Path, workers: int) -> None:
    """Train every model of the run that is not in the cache yet, ``workers`` at a time, each
    worker on its share of torch's threads; no worker starts when every one is cached."""
    jobs: list[tuple] = [
        *((_train, ms, "gallery") for ms in cfg.gallery_models),
        (_train, cfg.query_model, "query"),
        *((_train, ms, "gallery") for ms in cfg.diversity_models),
        (_train, cfg.old_query_model, "query"),
    ]
    cached = cached_models(cfg, train, models_dir)
    # imported models need no training
    jobs = [job for job in jobs if job[1].checkpoint is None and job[1].name not in cached]
    teachers = {ms.name: ms for ms in cfg.gallery_models if f"kd-{ms.name}" not in cached}
    if not jobs and not teachers:
        log.info("every model is in the cache %s", models_dir)
        return
    threads = max(1, torch.get_num_threads() // workers)
    log.info("training models: %d processes of %d thread(s)", workers, threads)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    init = (cfg, train, models_dir, threads, logging.getLogger().getEffectiveLevel())
    with (
        ProcessPoolExecutor(workers, context, initializer=_start, initargs=init) as pool,
        tqdm(total=len(jobs) + len(teachers), desc="models", unit="model") as bar,
    ):
        pending: set[Future] = {pool.submit(*job) for job in jobs}
        training = {job[1].name for job in jobs}  # the other teachers are there already
        pending |= {pool.submit(_distill, ms) for n, ms in teachers.items() if n not in training}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    name = future.result()  # a worker's error (bad data, full disk) is raised
                    bar.update()
                    if name in teachers:
                        pending.add(pool.submit(_distill, teachers[name]))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the queued models never start
            raise


def _start(cfg: ExperimentConfig, train: ImageSet, models_dir: Path, threads: int, level) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _worker.update(cfg=cfg, train=train, models_dir=models_dir)


def _train(ms: ModelSpec, role: str) -> str:
    get_model(ms, _worker["cfg"], _worker["train"], _worker["models_dir"], role, progress=False)
    return ms.name


def _distill(teacher: ModelSpec) -> str:
    cfg, train, models_dir = _worker["cfg"], _worker["train"], _worker["models_dir"]
    model, config = get_model(teacher, cfg, train, models_dir, "gallery", progress=False)
    get_distilled(
        cfg.query_model, teacher.name, model, config["fingerprint"], cfg, train, models_dir, False
    )
    return f"kd-{teacher.name}"
