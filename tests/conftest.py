"""Shared fixtures: one tiny reference run on scikit-learn's digits for the whole session."""

from __future__ import annotations

import pytest

from gallery_builder.evaluate import run_experiment
from gallery_builder.experiment import PRESETS
from gallery_builder.report import write_report


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """(config, report, folder) of the digits preset: models in folder/models, heads in
    folder/heads/{unified,to-query}."""
    out = tmp_path_factory.mktemp("digits-run")
    cfg = PRESETS["digits"]()
    report = run_experiment(cfg, out)
    write_report(report, out)
    return cfg, report, out
