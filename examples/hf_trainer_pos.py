"""UPOS tagging with ``AutoModelForTokenClassification``, the Hugging Face ``Trainer`` and language
subnetworks, on Universal Dependencies treebanks (CoNLL-U) with multilingual-e5-small.

Each language's attention heads are found from its own training sentences and the model's own
loss (``find_subnetworks``); ``SubnetworkTrainer`` then trains on batches mixing the languages,
each sentence through its language's heads, with exact masked updates; accuracy is printed per
language on the development sentences, through each language's subnetwork::

    python examples/hf_trainer_pos.py --ud-root ../shared/data/ud \\
        --model ../shared/models/multilingual-e5-small --languages en_ewt it_isdt ko_kaist --steps 200

(``SUBNETS_UD_ROOT`` and ``SUBNETS_E5_PATH`` are the defaults of ``--ud-root`` and ``--model``.)
The subnetwork set is saved with the model card to ``<output>/subnetworks``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import datasets
import torch
import transformers

from subnets.data.hf import conllu_dataset
from subnets.hf import SubnetworkConfig, SubnetworkTrainer, find_subnetworks, with_subnetworks

UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X"]  # fmt: skip


def tokenize(dataset: datasets.Dataset, tokenizer, max_length: int = 128) -> datasets.Dataset:
    """Subword inputs with each word's tag on its first subword (-100 elsewhere); the language kept."""

    def encode(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = []
        for i, tags in enumerate(batch["upos"]):
            previous, row = None, []
            for word in encoded.word_ids(i):
                row.append(-100 if word is None or word == previous else UPOS.index(tags[word]))
                previous = word
            labels.append(row)
        return {**encoded, "labels": labels}

    return dataset.map(
        encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "language"]
    )


def accuracy(model, dataset: datasets.Dataset, collator, code: str, batch_size: int = 32) -> float:
    """Share of words (first subwords) tagged right, through ``code``'s subnetwork."""
    correct = total = 0
    model.eval()
    columns = [c for c in dataset.column_names if c != "language"]
    with torch.no_grad(), model.language(code):
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator([{k: row[k] for k in columns} for row in rows])
            labels = batch.pop("labels")
            predicted = model(**batch).logits.argmax(-1)
            words = labels != -100
            correct += int((predicted[words] == labels[words]).sum())
            total += int(words.sum())
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ud-root", default=os.environ.get("SUBNETS_UD_ROOT", "../shared/data/ud"))
    parser.add_argument(
        "--model", default=os.environ.get("SUBNETS_E5_PATH", "../shared/models/multilingual-e5-small")
    )
    parser.add_argument("--languages", nargs="+", default=["en_ewt", "it_isdt", "ko_kaist"])
    parser.add_argument("--train-sentences", type=int, default=400, help="per language")
    parser.add_argument("--dev-sentences", type=int, default=100, help="per language")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--search-sentences", type=int, default=64, help="per language, to find the subnetworks"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.75)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--output", default="hf_trainer_pos_output")
    arguments = parser.parse_args()

    root = Path(arguments.ud_root)
    if not root.is_dir():
        parser.error(f"UD treebanks not found at {root}: pass --ud-root or set SUBNETS_UD_ROOT")
    if arguments.model.startswith((".", "/")) and not Path(arguments.model).is_dir():  # a path, not a hub id
        parser.error(f"model not found at {arguments.model}: pass --model or set SUBNETS_E5_PATH")
    tokenizer = transformers.AutoTokenizer.from_pretrained(arguments.model)
    collator = transformers.DataCollatorForTokenClassification(tokenizer)
    train, dev = {}, {}
    sizes = {"train": arguments.train_sentences, "dev": arguments.dev_sentences}
    for code in arguments.languages:  # the first sentences of each file, tokenized
        for split, data in (("train", train), ("dev", dev)):
            rows = conllu_dataset(root / code / f"{split}.conllu", code)
            data[code] = tokenize(rows.select(range(min(sizes[split], len(rows)))), tokenizer)

    transformers.set_seed(0)
    # float32: transformers 5 keeps a checkpoint's own precision (e5-small's is float16, slow on a CPU)
    dtype = {"dtype" if transformers.__version__ >= "5" else "torch_dtype": torch.float32}
    base = transformers.AutoModelForTokenClassification.from_pretrained(
        arguments.model,
        num_labels=len(UPOS),
        id2label=dict(enumerate(UPOS)),
        label2id={t: i for i, t in enumerate(UPOS)},
        **dtype,
    )
    model = with_subnetworks(base, SubnetworkConfig(units="heads", keep_ratio=arguments.keep_ratio))
    find_subnetworks(model, {code: data.select(range(min(arguments.search_sentences, len(data)))) for code, data in train.items()},
                     batch_size=16,
                     collate_fn=collator)  # fmt: skip
    for code, subnetwork in model.masks.items():
        print(f"{code}: keeps {subnetwork.num_units_kept} of {subnetwork.unit_mask.numel()} heads")

    args = transformers.TrainingArguments(
        output_dir=arguments.output, max_steps=arguments.steps, per_device_train_batch_size=arguments.batch_size,
        learning_rate=arguments.lr, warmup_steps=max(1, arguments.steps // 10), weight_decay=0.01, logging_steps=max(1, arguments.steps // 4),
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    mixed = datasets.concatenate_datasets(list(train.values())).shuffle(seed=0)
    SubnetworkTrainer(model, args, train_dataset=mixed, data_collator=collator).train()
    for code in arguments.languages:
        print(f"{code}: UPOS accuracy {accuracy(model, dev[code], collator, code):.2f}")
    model.save_pretrained(Path(arguments.output) / "subnetworks", made_by="examples/hf_trainer_pos.py")


if __name__ == "__main__":
    main()
