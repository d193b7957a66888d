"""Command-line flags generated from the settings dataclasses (one source: common.config)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from common.config import setting_help


def add_setting_flags(
    parser: argparse.ArgumentParser, cls: type, prefix: str, *, exclude: tuple[str, ...] = ()
) -> None:
    """``--kebab-case VALUE`` for every field of ``cls`` but the ``exclude``d (kebab-case
    names: settings this command does not read, so neither offered nor accepted), stored as
    ``<prefix>_<field>`` (None when not given), with its help line and default."""
    defaults = cls().to_dict()
    for f in fields(cls):
        key = f.name.replace("_", "-")
        if key in exclude:
            continue
        parser.add_argument(
            "--" + key,
            dest=f"{prefix}_{f.name}",
            default=None,
            metavar="VALUE",
            help=setting_help(key, defaults[key]),
        )
