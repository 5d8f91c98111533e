"""``python -m subnets.export run=<run folder> output=<folder> [checkpoint=best|last] [language=<code>]
[overwrite=true] [force=true]``

Writes a trained run as Hugging Face artifacts (``subnets.hf.export.export_run``): the
fine-tuned transformer and tokenizer as a folder ``AutoModel.from_pretrained`` loads (a LoRA
run's adapter merged in), the task head (``task_head.safetensors`` and ``task_head.json``) and,
for a subnetwork method, the subnetwork set (``subnetworks/``, loadable with
``subnets.hf.SubnetworkModel.from_pretrained``); with ``language=<code>``, also that language's
subnetwork baked into a smaller transformer (``pruned-<code>/``, loadable with
``subnets.hf.prune.load_pruned``; for a run trained with ``method.apply=gradient`` only with
``force=true``, as it then differs from what the run computed). An ``output`` that is not empty
is refused, unless it holds an earlier export and ``overwrite=true`` (which replaces it whole).
"""

from subnets.cli import main_of, split_arguments


def export_command(argv: list[str]) -> None:
    from subnets.hf.export import export_run

    own = ("run", "output", "checkpoint", "language", "overwrite", "force")
    values, rest = split_arguments(argv, own, ("run", "output"), __doc__)
    if rest:
        raise ValueError(f"subnets-export takes run=, output=, checkpoint=, language=, overwrite= and force= only; "
                         f"got {' '.join(rest)}")  # fmt: skip
    written = export_run(values["run"], values["output"], values.get("checkpoint", "best"), values.get("language"),
                         overwrite=flag(values, "overwrite"), force=flag(values, "force"))  # fmt: skip
    for what, where in written.items():
        print(f"{what}: {where}")


def flag(values: dict[str, str], key: str) -> bool:
    """The command-line setting ``key=true|false`` (false when absent)."""
    value = values.get(key, "false").lower()
    if value not in ("true", "false"):
        raise ValueError(f"{key}={values[key]}: expected true or false")
    return value == "true"


def main() -> None:
    """``subnets-export`` and ``python -m subnets.export``."""
    main_of(export_command, __doc__)


if __name__ == "__main__":
    main()
