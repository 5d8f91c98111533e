"""``python -m subnets.predict run=<run folder> input=<file> output=<file> [language=<code>]
[support=<file>] [format=auto|...] [checkpoint=best|last] [train.device=cpu]``

Annotates ``input`` with a trained run (``subnets.runs.trained.TrainedRun.predict_file``) into
``output``, in the run's task's format: for parsing and tagging, CoNLL-U (any columns present
are kept; the predicted ones are filled in) or plain text with one pre-tokenized sentence per
line (``format=conllu|text``); for NER, CoNLL (a token per line; ``format=conll``) or text, into
``token<TAB>tag`` lines; for classification, JSON lines or TSV with ``text`` (and
``text_pair``), into JSON lines with the predicted ``label``; for language modelling, text,
into JSON lines with each line's perplexity. ``language`` picks the subnetwork: a training
language's mask, or for any other language the test-time policy's (``masks.target_policy``;
``support`` and ``nearest`` need ``support=``, annotated examples of the language).
``output`` is written atomically; a symbolic link there is kept (its target is written), a FIFO
or a device (``output=/dev/stdout``) is written through, never replaced.
``python -m subnets.parse`` is the same command under its earlier name.
"""

from subnets.cli import main_of, split_arguments
from subnets.files import check_output_path
from subnets.runs.trained import load_run


def predict_command(argv: list[str]) -> None:
    own = ("run", "input", "output", "language", "support", "format", "checkpoint")
    values, overrides = split_arguments(argv, own, ("run", "input", "output"), __doc__)
    inputs = [values["input"], *([values["support"]] if values.get("support") else [])]
    check_output_path(values["output"], inputs)  # before the model is loaded
    trained = load_run(values["run"], values.get("checkpoint", "best"), overrides=overrides)
    path = trained.predict_file(values["input"], values["output"], values.get("language") or None,
                                values.get("support") or None, values.get("format", "auto"))  # fmt: skip
    print(f"annotated {values['input']} into {path} with {trained.checkpoint} (step {trained.step}; "
          f"task {trained.task.name})")  # fmt: skip


def main() -> None:
    """``subnets-predict``, ``python -m subnets.predict`` and ``python -m subnets.parse``."""
    main_of(predict_command, __doc__)


if __name__ == "__main__":
    main()
