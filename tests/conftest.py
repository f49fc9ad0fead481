"""Shared fixtures: one tiny reference run on scikit-learn's digits for the whole session."""

from __future__ import annotations

import pytest
import torch

from gallery_builder.evaluation.experiment import PRESETS
from gallery_builder.evaluation.report import write_report
from gallery_builder.evaluation.run import run_experiment


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's models are tiny: on a 2-core machine one thread runs them fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """(config, report, folder) of the digits preset: models in folder/models, heads in
    folder/heads/{unified,to-query}."""
    out = tmp_path_factory.mktemp("digits-run")
    cfg = PRESETS["digits"]()
    report = run_experiment(cfg, out)
    write_report(report, out)
    return cfg, report, out
