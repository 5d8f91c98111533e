"""Finding UD treebanks in a folder (subnets.data.discovery)."""

from __future__ import annotations

import json

import pytest

from subnets.data.discovery import (
    SPLITS,
    LanguageFiles,
    discover_languages,
    manifest_targets,
    select_languages,
)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    return path


def test_code_folder_layout(tmp_path):
    for split in SPLITS:
        touch(tmp_path / "en_ewt" / f"{split}.conllu")
    touch(tmp_path / "ko_kaist" / "train.conllu")
    found = discover_languages(tmp_path)
    assert sorted(found) == ["en_ewt", "ko_kaist"]
    en = found["en_ewt"]
    assert isinstance(en, LanguageFiles)
    assert en.code == "en_ewt"
    assert en.folder == tmp_path / "en_ewt"
    assert en.files == {split: tmp_path / "en_ewt" / f"{split}.conllu" for split in SPLITS}
    assert en.path("dev") == tmp_path / "en_ewt" / "dev.conllu"
    assert set(found["ko_kaist"].files) == {"train"}


def test_official_release_layout(tmp_path):
    folder = tmp_path / "UD_English-EWT"
    for split in SPLITS:
        touch(folder / f"en_ewt-ud-{split}.conllu")
    touch(tmp_path / "UD_Korean-Kaist" / "ko_kaist-ud-test.conllu")
    found = discover_languages(tmp_path)
    assert sorted(found) == ["en_ewt", "ko_kaist"]
    assert found["en_ewt"].folder == folder
    assert found["en_ewt"].files == {split: folder / f"en_ewt-ud-{split}.conllu" for split in SPLITS}
    assert found["ko_kaist"].path("test") == tmp_path / "UD_Korean-Kaist" / "ko_kaist-ud-test.conllu"


def test_both_layouts_in_one_root(tmp_path):
    touch(tmp_path / "syn_svo" / "train.conllu")
    touch(tmp_path / "syn_svo" / "dev.conllu")
    touch(tmp_path / "UD_French-GSD" / "fr_gsd-ud-train.conllu")
    touch(tmp_path / "UD_French-GSD" / "fr_gsd-ud-test.conllu")
    found = discover_languages(tmp_path)
    assert sorted(found) == ["fr_gsd", "syn_svo"]
    assert set(found["syn_svo"].files) == {"train", "dev"}
    assert set(found["fr_gsd"].files) == {"train", "test"}
    assert found["fr_gsd"].path("train").name == "fr_gsd-ud-train.conllu"


def test_files_matching_neither_layout_are_ignored(tmp_path):
    touch(tmp_path / "en_ewt" / "train.conllu")
    touch(tmp_path / "en_ewt" / "extra.conllu")  # not a split name
    touch(tmp_path / "en_ewt" / "dev.txt")  # not .conllu
    touch(tmp_path / "en_ewt" / "test.conllu.bak")
    touch(tmp_path / "UD_English-EWT2" / "en_ewt2-ud-validation.conllu")  # unknown split
    touch(tmp_path / "UD_English-EWT2" / "README.md")
    touch(tmp_path / "UD_German-GSD" / "de_gsd-train.conllu")  # no "-ud-"
    touch(tmp_path / "train.conllu")  # directly in the root, not in a treebank folder
    (tmp_path / "empty_folder").mkdir()
    found = discover_languages(tmp_path)
    assert list(found) == ["en_ewt"]
    assert found["en_ewt"].files == {"train": tmp_path / "en_ewt" / "train.conllu"}


def test_empty_root_finds_nothing(tmp_path):
    assert discover_languages(tmp_path) == {}


def test_missing_split_names_the_split_and_the_available_ones(tmp_path):
    touch(tmp_path / "en_ewt" / "train.conllu")
    touch(tmp_path / "en_ewt" / "dev.conllu")
    treebank = discover_languages(tmp_path)["en_ewt"]
    with pytest.raises(FileNotFoundError) as info:
        treebank.path("test")
    message = str(info.value)
    assert "en_ewt" in message
    assert "no test split" in message
    assert "train" in message and "dev" in message


def test_treebank_without_files_says_none(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no train split \(it has: none\)"):
        LanguageFiles("xx_yy", folder=tmp_path).path("train")


def test_select_languages_in_the_requested_order(tmp_path):
    for code in ("en_ewt", "fr_gsd", "ko_kaist"):
        touch(tmp_path / code / "train.conllu")
    found = discover_languages(tmp_path)
    selected = select_languages(found, ["ko_kaist", "en_ewt"], "languages.train")
    assert [t.code for t in selected] == ["ko_kaist", "en_ewt"]
    assert select_languages(found, [], "languages.eval") == []


def test_select_unknown_code_lists_available_codes_and_the_setting(tmp_path):
    for code in ("fr_gsd", "en_ewt"):
        touch(tmp_path / code / "train.conllu")
    found = discover_languages(tmp_path)
    with pytest.raises(ValueError) as info:
        select_languages(found, ["en_ewt", "xx_nope", "yy_nope"], "languages.train", root=tmp_path)
    message = str(info.value)
    assert message.startswith("languages.train:")
    assert "xx_nope" in message and "yy_nope" in message
    assert "available: en_ewt, fr_gsd" in message
    assert str(tmp_path) in message


def test_select_from_nothing_says_none():
    with pytest.raises(ValueError, match="available: none"):
        select_languages({}, ["en_ewt"], "languages.eval")


def test_missing_root_raises_file_not_found(tmp_path):
    missing = tmp_path / "no_such_ud"
    with pytest.raises(FileNotFoundError) as info:
        discover_languages(missing)
    assert str(missing) in str(info.value)


def test_same_code_in_two_folders_is_an_error(tmp_path):
    touch(tmp_path / "en_ewt" / "train.conllu")
    touch(tmp_path / "UD_English-EWT" / "en_ewt-ud-dev.conllu")
    with pytest.raises(ValueError, match="en_ewt found in two folders"):
        discover_languages(tmp_path)


def test_manifest_targets_are_test_roles_and_unlisted_folders(tmp_path):
    for code in ("aa_one", "bb_two", "cc_three", "dd_four", "ee_five"):
        touch(tmp_path / code / "test.conllu")
    manifest = [{"code": "aa_one", "role": "train"}, {"code": "bb_two", "role": "test"},
                {"code": "cc_three", "role": "dev"}, {"code": "ee_five", "role": "test"}]  # fmt: skip
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    found = discover_languages(tmp_path)
    # bb and ee by role; dd because no manifest lists it; ee excluded as a training language
    assert manifest_targets(tmp_path, found, exclude=["ee_five"]) == ["bb_two", "dd_four"]
    (tmp_path / "MANIFEST.json").unlink()
    assert manifest_targets(tmp_path, found, exclude=["aa_one"]) == [
        "bb_two",
        "cc_three",
        "dd_four",
        "ee_five",
    ]
    (tmp_path / "MANIFEST.json").write_text('{"code": "aa_one"')
    with pytest.raises(ValueError, match=r"MANIFEST\.json: expected a JSON list"):
        manifest_targets(tmp_path, found)
