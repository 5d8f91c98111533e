"""``python -m subnets.parse run=<run folder> input=<file> output=<file> [language=<code>]
[support=<CoNLL-U file>] [format=auto|conllu|text] [checkpoint=best|last] [train.device=cpu]``

Parses ``input`` with a trained run (:meth:`subnets.trained.TrainedRun.parse_file`) into the
CoNLL-U file ``output``. ``input`` is CoNLL-U (any columns present are kept; HEAD and DEPREL,
and with a tagger UPOS, are filled in) or plain text with one pre-tokenized sentence per line.
``language`` picks the subnetwork: a training language's mask, or for any other language the
test-time policy's (``masks.target_policy``; ``support`` and ``nearest`` need ``support=``,
annotated sentences of the language).
"""

from subnets.cli import main_of, split_arguments
from subnets.files import check_output_path
from subnets.trained import load_run


def parse_command(argv: list[str]) -> None:
    own = ("run", "input", "output", "language", "support", "format", "checkpoint")
    values, overrides = split_arguments(argv, own, ("run", "input", "output"), __doc__)
    inputs = [values["input"], *([values["support"]] if values.get("support") else [])]
    check_output_path(values["output"], inputs)  # before the model is loaded
    trained = load_run(values["run"], values.get("checkpoint", "best"), overrides=overrides)
    path = trained.parse_file(values["input"], values["output"], values.get("language") or None,
                              values.get("support") or None, values.get("format", "auto"))  # fmt: skip
    print(f"parsed {values['input']} into {path} with {trained.checkpoint} (step {trained.step})")


if __name__ == "__main__":
    main_of(parse_command, __doc__)
