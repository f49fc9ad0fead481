"""Options shared by every command that loads model folders (cmce, cmce-build-gallery,
cmce-export)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["TRUST_FLAG", "trust_option", "experiment_option", "from_experiment"]

# the spelling gallery_builder.models.saving.TRUST_FLAG puts in its errors (a test keeps them
# equal; importing it here would import torch into every `--help`)
TRUST_FLAG = "--trust-code"

trust_option = click.option(
    TRUST_FLAG,
    "trust",
    multiple=True,
    metavar="ENTRY_POINT|DIR",
    help="Let a model folder run code: an imported model (`cmce import-model`) imports and "
    "calls its factory, a TorchScript one runs its program. Give the factory as "
    "package.module:callable (trusts it in any folder, with that folder's kwargs) or the model "
    "folder (trusts that folder's code only). Repeatable. Without it such models are refused "
    "with a message saying what they would run; built-in architectures need no trust.",
)

experiment_option = click.option(
    "--experiment",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A `cmce experiment` / `cmce demo` output folder: take the query model, gallery "
    "models and heads its recommendation.json names (the setting that won on its validation "
    "classes). Explicit --model/--models/--heads win over it.",
)


def from_experiment(experiment: Path | None, **given):
    """Fill the folders not ``given`` (None or empty) from ``experiment``'s recommendation:
    keys ``heads``, ``query_model``, ``gallery_models``; UsageError when one stays missing."""
    found = {}
    if experiment is not None:
        from gallery_builder.evaluation.fusion_fit import recommended

        found = recommended(experiment)
    out = {}
    for key, value in given.items():
        out[key] = value or found.get(key)
        if not out[key]:
            flag = {"heads": "--heads", "query_model": "--model", "gallery_models": "--models"}
            raise click.UsageError(f"give {flag[key]} or --experiment DIR")
    return out
