"""``python -m subnets.consolidate run=<run folder>``

Writes the whole model of a sharded run (``train.parallel=fsdp``) into its checkpoints: the model
shards of ``checkpoints/last-<step>.dcp/`` and ``best-<step>.dcp/`` are read in this one process
(``torch.distributed.checkpoint``, whatever number of processes wrote them) and stored in
``last.safetensors`` and ``best.safetensors`` beside what those already hold. The run then
evaluates, predicts and exports like any other (``python -m subnets.evaluate``,
``subnets.predict``, ``subnets.export``: a Hugging Face folder); the shards stay, so that the
run can still continue under ``torchrun``. Needs memory for the whole model (not its optimizer
state).
"""

from pathlib import Path

from subnets.cli import main_of, split_arguments


def consolidate_run(folder: str | Path) -> list[Path]:
    """Store the whole model in each sharded checkpoint of run ``folder``; returns the files
    written (a checkpoint that already holds its model is left as it is)."""
    from subnets.parallel.sharding import consolidated_model_state
    from subnets.runs.checkpoint import load_checkpoint, save_checkpoint
    from subnets.runs.checkpoint_schema import Key
    from subnets.runs.folder import RunFolder

    paths, written = RunFolder(folder), []
    checkpoints = [p for p in (paths.last_checkpoint, paths.best_checkpoint) if p.exists()]
    if not checkpoints:
        raise FileNotFoundError(
            f"run={folder} has no checkpoint ({paths.last_checkpoint} or {paths.best_checkpoint})"
        )
    with paths.lock():
        for path in checkpoints:
            state = load_checkpoint(path)
            if Key.SHARDED not in state:
                raise ValueError(
                    f"{path} is not sharded (written without train.parallel=fsdp): nothing to consolidate"
                )
            if Key.MODEL in state:
                continue
            save_checkpoint(
                path, {**state, Key.MODEL: consolidated_model_state(path.parent / state[Key.SHARDED])}
            )
            written.append(path)
    return written


def consolidate_command(argv: list[str]) -> None:
    values, rest = split_arguments(argv, ("run",), ("run",), __doc__)
    if rest:
        raise ValueError(f"subnets-consolidate takes run= only; got {' '.join(rest)}")
    written = consolidate_run(values["run"])
    for path in written:
        print(f"whole model written into {path}")
    if not written:
        print(f"run={values['run']}: its checkpoints already hold the whole model")


def main() -> None:
    """``subnets-consolidate`` and ``python -m subnets.consolidate``."""
    main_of(consolidate_command, __doc__)


if __name__ == "__main__":
    main()
