"""Training a run's models in worker processes gives the models of a sequential run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from gallery_builder.evaluation import parallel as parallel_module
from gallery_builder.evaluation.experiment import load_splits
from gallery_builder.evaluation.parallel import train_models
from query_sdk.errors import DataError


def _fingerprints(models_dir) -> dict[str, str]:
    return {
        d.name: json.loads((d / "config.json").read_text())["fingerprint"]
        for d in sorted(models_dir.iterdir())
    }


def test_workers_train_the_models_of_a_sequential_run(digits_run, tmp_path):
    cfg, _, run_dir = digits_run  # the suite runs one thread, so the run trained in turn
    parallel = replace(cfg, workers=2)
    train_models(parallel, load_splits(parallel).train, tmp_path / "models", parallel.workers)
    expected = [m.name for m in (*cfg.gallery_models, cfg.query_model, cfg.old_query_model)]
    expected += [f"kd-{m.name}" for m in cfg.gallery_models]
    got = _fingerprints(tmp_path / "models")
    assert sorted(got) == sorted(expected)
    # one thread per worker, as in the sequential run: the same weights, bit for bit
    assert got == {name: _fingerprints(run_dir / "models")[name] for name in got}


def test_a_worker_error_stops_the_training_with_its_message(digits_run, tmp_path):
    cfg, _, _ = digits_run
    starved = replace(cfg.gallery_models[0], subset=0.001)  # one training image
    bad = replace(cfg, gallery_models=[starved, *cfg.gallery_models[1:]], workers=2)
    with pytest.raises(DataError, match=f"{starved.name}: 1 training samples"):
        train_models(bad, load_splits(bad).train, tmp_path / "models", bad.workers)
    assert not (tmp_path / "models" / f"kd-{starved.name}").exists()


def test_a_warm_run_starts_no_worker_and_trains_only_what_is_missing(
    digits_run, tmp_path, monkeypatch
):
    cfg, _, run_dir = digits_run
    warm = replace(cfg, workers=2)
    train = load_splits(warm).train
    models = tmp_path / "models"
    shutil.copytree(run_dir / "models", models)
    before = _fingerprints(models)
    started = []
    real_pool = parallel_module.ProcessPoolExecutor

    def pool(*args, **kwargs):
        started.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(parallel_module, "ProcessPoolExecutor", pool)
    train_models(warm, train, models, 2)
    assert started == []  # every model cached: no worker process
    missing = f"kd-{cfg.gallery_models[0].name}"
    shutil.rmtree(models / missing)
    (models / cfg.query_model.name / "config.json").write_text("{}")  # not a model config
    kept = {d.name: (d / "config.json").stat().st_mtime_ns for d in models.iterdir()}
    del kept[cfg.query_model.name]
    train_models(warm, train, models, 2)
    assert len(started) == 1
    assert _fingerprints(models) == before  # the two were trained again, the same
    assert kept == {n: (models / n / "config.json").stat().st_mtime_ns for n in kept}
