"""``python -m subnets.export run=<run folder> output=<folder> [checkpoint=best|last] [language=<code>]``

Writes a trained run as Hugging Face artifacts (:func:`subnets.hf.export.export_run`): the
fine-tuned transformer and tokenizer as a folder ``AutoModel.from_pretrained`` loads, the task
head (``task_head.safetensors`` and ``task_head.json``) and, for a subnetwork method, the
subnetwork set (``subnetworks/``, loadable with ``subnets.hf.SubnetworkModel.from_pretrained``);
with ``language=<code>``, also that language's subnetwork baked into a smaller transformer
(``pruned-<code>/``, loadable with ``subnets.hf.prune.load_pruned``).
"""

from subnets.cli import main_of, split_arguments


def export_command(argv: list[str]) -> None:
    from subnets.hf.export import export_run

    values, rest = split_arguments(
        argv, ("run", "output", "checkpoint", "language"), ("run", "output"), __doc__
    )
    if rest:
        raise ValueError(
            f"subnets-export takes run=, output=, checkpoint= and language= only; got {' '.join(rest)}"
        )
    written = export_run(
        values["run"], values["output"], values.get("checkpoint", "best"), values.get("language")
    )
    for what, where in written.items():
        print(f"{what}: {where}")


def main() -> None:
    """``subnets-export`` and ``python -m subnets.export``."""
    main_of(export_command, __doc__)


if __name__ == "__main__":
    main()
