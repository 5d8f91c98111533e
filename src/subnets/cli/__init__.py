"""The command-line programs, each a module here and a console script (``pyproject.toml``):

* ``subnets-train`` / ``python -m subnets.train``: train and evaluate (``subnets.cli.train``, Hydra);
* ``subnets-evaluate`` / ``python -m subnets.evaluate``: evaluate a trained run (``subnets.cli.evaluate``);
* ``subnets-predict`` / ``python -m subnets.predict`` (and its earlier name ``subnets.parse``):
  annotate a file with a trained run (``subnets.cli.predict``);
* ``subnets-report`` / ``python -m subnets.report``: a study's tables and figures (``subnets.cli.report``).
* ``subnets-consolidate`` / ``python -m subnets.consolidate``: the whole model of a sharded run's
  checkpoints (``subnets.cli.consolidate``).

The commands that use a trained run take ``key=value`` pairs, as Hydra's command line writes them
(``split_arguments``), and turn an error into its message and exit status 1 (``main_of``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from subnets.config import SettingError
from subnets.runs.folder import RunFolderInUse


def split_arguments(
    argv: Sequence[str], own: Sequence[str], required: Sequence[str] = (), usage: str = ""
) -> tuple[dict[str, str], list[str]]:
    """The command's ``own`` ``key=value`` arguments, and the rest (config overrides)."""
    values, rest = {}, []
    for argument in argv:
        if argument in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        key, equals, value = argument.partition("=")
        if not equals:
            raise SettingError(f"{argument!r}: expected key=value\n{usage}")
        if key in own:
            values[key] = value
        else:
            rest.append(argument)
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise SettingError(f"missing {', '.join(k + '=...' for k in missing)}\n{usage}")
    return values, rest


# What a command refuses with its message alone (a bad setting, input file or folder); any other
# exception is a fault of the program and keeps its traceback.
REFUSALS = (SettingError, ValueError, OSError, RunFolderInUse)


def traceback_wanted() -> bool:
    """Whether a refusal should also print its traceback: ``SUBNETS_TRACEBACK=1`` (or Hydra's
    ``HYDRA_FULL_ERROR=1``) in the environment."""
    return any(
        os.environ.get(name, "") not in ("", "0") for name in ("SUBNETS_TRACEBACK", "HYDRA_FULL_ERROR")
    )


def refuse(error: BaseException) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 1."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1) from None


def main_of(command, usage: str) -> None:
    """Run ``command(argv)`` as a command-line program: log to stderr, and turn an error into
    its message and exit status 1 (no traceback for a bad setting or input, unless
    ``SUBNETS_TRACEBACK=1``)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        command(sys.argv[1:])
    except REFUSALS as error:
        if traceback_wanted():
            raise
        refuse(error)
