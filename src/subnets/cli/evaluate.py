"""``python -m subnets.evaluate run=<run folder> [checkpoint=best|last] [output=<folder>] [overwrite=true] [overrides]``

Evaluates a trained run (``subnets.runs.trained.evaluate_run``) on the languages and settings
the overrides name, for example::

    python -m subnets.evaluate run=outputs/default/+method=dynamic languages.target=[syn_vos]
    python -m subnets.evaluate run=outputs/ud_fewshot/+experiment=ud_fewshot,+method=static fewshot.k=10

and writes results.json and predictions into ``output`` (default ``<run>/evaluations/<overrides>``).
An earlier evaluation there is replaced whole when it evaluated the same run, checkpoint and
overrides; one of another run or settings is refused unless ``overwrite=true``.
"""

from subnets.cli import main_of, split_arguments
from subnets.cli.export import flag
from subnets.runs.trained import evaluate_run


def evaluate_command(argv: list[str]) -> None:
    values, overrides = split_arguments(argv, ("run", "checkpoint", "output", "overwrite"), ("run",), __doc__)
    evaluate_run(values["run"], overrides, checkpoint=values.get("checkpoint", "best"), output=values.get("output"),
                 overwrite=flag(values, "overwrite"))  # fmt: skip


def main() -> None:
    """``subnets-evaluate`` and ``python -m subnets.evaluate``."""
    main_of(evaluate_command, __doc__)


if __name__ == "__main__":
    main()
