"""The treebank cache (parsed and tokenized files as datasets on disk) and datasets treebanks."""

from __future__ import annotations

import json

import pytest
from conftest import scores, ud_job

from subnets.data import dataset, read_conllu
from subnets.data.cache import DataCache
from subnets.data.dataset import load_language
from subnets.data.discovery import discover_languages
from subnets.tasks import Parsing, parsing
from subnets.training.runner import run


def test_a_run_gives_the_same_results_without_the_cache_and_with_it_cold_or_warm(
    tmp_path, ud_root, monkeypatch
):
    cache = f"languages.cache_dir={tmp_path / 'cache'}"
    off = run(ud_job(ud_root, "languages.cache=false"), tmp_path / "off")
    assert not (tmp_path / "cache").exists()
    cold = run(ud_job(ud_root, cache), tmp_path / "cold")
    files_read = json.loads((tmp_path / "cold" / "run.json").read_text())["data"]
    assert len(list((tmp_path / "cache" / "parsed").iterdir())) == len(files_read) == 11
    monkeypatch.setattr(parsing, "read_conllu", lambda *a, **k: pytest.fail("a cached file was read again"))
    monkeypatch.setattr(dataset, "encode_words", lambda *a, **k: pytest.fail("cached pieces were computed"))
    warm = run(ud_job(ud_root, cache), tmp_path / "warm")
    assert scores(off) == scores(cold) == scores(warm)


def test_the_cache_keeps_the_skipped_sentences_and_follows_content_not_paths(tmp_path, ud_root):
    path = ud_root / "syn_vos" / "test.conllu"
    lines = path.read_text().split("\n")
    lines[2] = lines[2].replace("\t0\t", "\t99\t", 1)  # first word of the first sentence: HEAD out of range
    path.write_text("\n".join(lines))
    cache = DataCache(tmp_path / "cache")
    [treebank] = [t for code, t in discover_languages(ud_root).items() if code == "syn_vos"]
    fresh = load_language(treebank, "test", Parsing(), "skip")
    cached = load_language(treebank, "test", Parsing(), "skip", cache=cache)
    again = load_language(treebank, "test", Parsing(), "skip", cache=cache)
    assert fresh.skipped == cached.skipped == again.skipped == 1
    assert [(s.sent_id, s.forms, s.heads, s.deprels, s.lines, s.source) for s in again.examples] == [
        (s.sent_id, s.forms, s.heads, s.deprels, s.lines, s.source) for s in fresh.examples
    ]
    path.write_text(path.read_text().replace("\t99\t", "\t0\t", 1))  # repaired: other content, read again
    assert load_language(treebank, "test", Parsing(), "skip", cache=cache).skipped == 0
    with pytest.raises(ValueError, match="HEAD 99 out of range"):
        path.write_text("\n".join(lines))
        load_language(treebank, "test", Parsing(), "raise", cache=cache)


def save_as_datasets(conllu_root, datasets_root):
    """Each treebank of a CoNLL-U root as a datasets DatasetDict folder (the Hub's layout)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    from subnets.data.labels import UPOS

    for code, treebank in discover_languages(conllu_root).items():
        splits = {}
        for split, path in treebank.files.items():
            rows = {"idx": [], "tokens": [], "upos": [], "head": [], "deprel": []}
            for sentence in read_conllu(path).examples:
                rows["idx"].append(sentence.sent_id)
                rows["tokens"].append(sentence.forms)
                rows["upos"].append([UPOS.index(t) for t in sentence.upos])
                rows["head"].append([str(h) for h in sentence.heads])
                rows["deprel"].append(sentence.deprels)
            features = Features({"idx": Value("string"), "tokens": Sequence(Value("string")),
                        "upos": Sequence(ClassLabel(names=list(UPOS))), "head": Sequence(Value("string")),
                        "deprel": Sequence(Value("string"))})  # fmt: skip
            splits["validation" if split == "dev" else split] = Dataset.from_dict(rows, features=features)
        DatasetDict(splits).save_to_disk(str(datasets_root / code))


def test_a_datasets_data_root_trains_as_its_conllu_files_do(tmp_path, ud_root):
    save_as_datasets(ud_root, tmp_path / "hf")
    found = discover_languages(tmp_path / "hf")
    assert set(found) == set(discover_languages(ud_root)) and set(found["syn_svo"].files) == {
        "train",
        "dev",
        "test",
    }
    conllu = run(ud_job(ud_root, "languages.cache=false"), tmp_path / "conllu")
    hf = run(ud_job(tmp_path / "hf", "languages.cache=false"), tmp_path / "hf_run")
    for role in ("source", "dev", "target"):
        assert hf[role] == conllu[role]
    assert hf["fewshot"] == conllu["fewshot"]


def test_a_datasets_treebank_without_the_needed_columns_is_named(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a b"]})}).save_to_disk(str(tmp_path / "xx_bad"))
    [treebank] = discover_languages(tmp_path).values()
    with pytest.raises(ValueError, match=r"xx_bad/train: .* missing: tokens, upos, head, deprel"):
        load_language(treebank, "train", Parsing())
