"""Options shared by every command that loads model folders (cmce, cmce-build-gallery,
cmce-export)."""

from __future__ import annotations

import click

__all__ = ["TRUST_FLAG", "trust_option"]

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
