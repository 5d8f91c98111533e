"""Analyses: linear CKA, gradient conflict, parallel sentences, URIEL typology and the Mantel test."""

import itertools
import json
import math
from importlib import resources

import numpy as np
import pytest
import torch
from conftest import tiny_transformer
from scipy import stats

from subnets.analysis import (
    cka_matrix,
    conflict_matrix,
    cosine_matrix,
    language_gradients,
    linear_cka,
    negative_share,
    overlap_typology_correlation,
    parallel_sentence_ids,
    shared_parameters,
    typological_similarity,
    uriel_code,
)
from subnets.data.batching import Collator, encode_words
from subnets.data.dataset import LanguageData
from subnets.data.treebank import Sentence
from subnets.models.encoder import Encoder, train_subword_tokenizer
from subnets.models.parser import DependencyParser


def test_linear_cka_hand_computed_case():
    # Centred X has columns c1 = (1,-1,0), c2 = (0,1,-1): X'^T X' = [[2,-1],[-1,2]], norm sqrt(10).
    # Centred Y has columns d1 = (1,-1,0), d2 = (1,0,-1): Y'^T Y' = [[2,1],[1,2]], norm sqrt(10).
    # Y'^T X' = [[d1.c1, d1.c2], [d2.c1, d2.c2]] = [[2,-1],[1,1]], squared norm 7. CKA = 7 / 10.
    x = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]]) + np.array([5.0, -2.0])  # shifts test the centring
    y = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + 7.0
    assert linear_cka(x, y) == pytest.approx(0.7)
    assert linear_cka(y, x) == pytest.approx(0.7)


def test_linear_cka_invariances_symmetry_and_row_mismatch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4))
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert np.allclose(q.T @ q, np.eye(4))
    assert linear_cka(x, x @ q * 3 + np.array([1.0, -2.0, 0.5, 4.0])) == pytest.approx(1.0)
    y = rng.normal(size=(10, 6))
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    assert linear_cka(x, y) < 0.99
    with pytest.raises(ValueError):
        linear_cka(x, y[:9])


def test_cosine_matrix_and_negative_share():
    vectors = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([-1.0, 1.0])}
    languages, matrix = cosine_matrix(vectors)
    assert languages == ["a", "b", "c"]
    r = 1 / math.sqrt(2)
    expected = np.array([[1, 0, -r], [0, 1, r], [-r, r, 1]])
    assert np.allclose(matrix, expected)
    assert negative_share(matrix) == pytest.approx(1 / 3)  # only (a, c) of the three pairs

    _, with_zero = cosine_matrix({"a": torch.tensor([1.0, 2.0]), "z": torch.zeros(2)})
    assert with_zero[0, 0] == pytest.approx(1.0)
    assert (
        with_zero[0, 1] == with_zero[1, 0] == with_zero[1, 1] == 0.0
    )  # zero vector: cosine 0, even with itself


def sentence(sent_id, words, heads):
    return Sentence(sent_id, list(words), ["NOUN"] * len(words), heads, ["root"] + ["dep"] * (len(words) - 1))


@pytest.fixture(scope="module")
def parser_and_batches():
    torch.manual_seed(0)
    model = DependencyParser(
        Encoder(tiny_transformer()), arc_dim=16, label_dim=8
    )  # dropout 0.33: eval matters
    tokenizer = train_subword_tokenizer(["a b c d e f g h"] * 3, 50, 64)
    collator = Collator(tokenizer, 64)
    groups = {
        "en": [sentence("1", "abcd", [0, 1, 1, 2]), sentence("2", "efg", [2, 0, 2])],
        "de": [sentence("3", "hgfe", [0, 1, 2, 3]), sentence("4", "bad", [3, 3, 0])],
    }
    batches = {lang: collator(s, encode_words(tokenizer, s), lang) for lang, s in groups.items()}
    return model, batches


def reference_gradient(model, batch):
    model.eval()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    flat = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for _, p in shared_parameters(model)
    ]
    model.zero_grad(set_to_none=True)
    return torch.cat(flat)


def test_shared_parameters_exclude_embeddings(parser_and_batches):
    model, _ = parser_and_batches
    names = [n for n, _ in shared_parameters(model)]
    all_names = [n for n, _ in model.named_parameters()]
    assert any("embeddings." in n for n in all_names)
    assert names == [n for n in all_names if "embeddings." not in n]


def test_language_gradients_match_plain_backward(parser_and_batches):
    model, batches = parser_and_batches
    model.train()
    gradients = language_gradients(model, batches)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for lang, batch in batches.items():
        reference = reference_gradient(model, batch)
        assert gradients[lang].shape == reference.shape
        assert torch.allclose(gradients[lang], reference, rtol=1e-5, atol=1e-8), lang
    assert gradients["en"].abs().sum() > 0 and not torch.allclose(gradients["en"], gradients["de"])

    model.eval()
    language_gradients(model, batches)
    assert not model.training


def test_update_mask_zeroes_exactly_its_slice(parser_and_batches):
    model, batches = parser_and_batches
    parameters = shared_parameters(model)
    index = next(i for i, (name, _) in enumerate(parameters) if name == "arc.weight")
    start = sum(p.numel() for _, p in parameters[:index])
    end = start + parameters[index][1].numel()
    plain = language_gradients(model, batches)
    masked = language_gradients(
        model, batches, update_mask=lambda lang: {"arc.weight": torch.zeros_like(model.arc.weight)}
    )
    for lang in batches:
        assert plain[lang][start:end].abs().sum() > 0
        assert torch.equal(masked[lang][start:end], torch.zeros(end - start))
        assert torch.equal(masked[lang][:start], plain[lang][:start])
        assert torch.equal(masked[lang][end:], plain[lang][end:])


def test_conflict_matrix_record(parser_and_batches):
    model, batches = parser_and_batches
    en, de = (reference_gradient(model, batches[lang]).double() for lang in ("en", "de"))
    cosine = float(en @ de / (en.norm() * de.norm()))
    record = conflict_matrix(model, batches)
    assert record["languages"] == ["en", "de"]
    assert np.allclose(record["cosine"], [[1.0, cosine], [cosine, 1.0]], atol=1e-6)
    assert record["mean_cosine"] == pytest.approx(cosine, abs=1e-6)
    assert record["negative_share"] == (1.0 if cosine < 0 else 0.0)


def language(code, ids):
    return LanguageData(code, "test", [sentence(i, "ab", [0, 1]) for i in ids])


def test_parallel_sentence_ids():
    data = {
        "a": language("a", ["p", "x", "y", "z"]),
        "b": language("b", ["z", "y", "x", "q"]),
        "c": language("c", ["r", "x"]),
        "d": language("d", ["s"]),
    }
    # a, b and c all have x; d shares nothing. The largest group wins over the longer id list of a and b.
    assert parallel_sentence_ids(data) == (["a", "b", "c"], ["x"])
    pair = {"a": data["a"], "b": data["b"], "d": data["d"]}
    assert parallel_sentence_ids(pair) == (["a", "b"], ["x", "y", "z"])  # in a's order
    assert parallel_sentence_ids(pair, limit=2) == (["a", "b"], ["x", "y"])
    assert parallel_sentence_ids({"c": data["c"], "d": data["d"]}) == ([], [])
    # x joins a and b, y joins a and c, but no id is in all three: a pair with a common id wins.
    split = {"a": language("a", ["x", "y"]), "b": language("b", ["x"]), "c": language("c", ["y"])}
    assert parallel_sentence_ids(split) == (["a", "b"], ["x"])


def test_cka_matrix_is_pairwise_linear_cka():
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(8)]
    reps = {lang: {i: rng.normal(size=5) for i in ids} for lang in ("a", "b", "c")}
    languages, matrix = cka_matrix(reps, ids[::-1])
    assert languages == ["a", "b", "c"]
    assert np.array_equal(np.diag(matrix), np.ones(3))
    for (i, first), (j, second) in itertools.combinations(enumerate(languages), 2):
        stacked = [np.stack([reps[lang][s] for s in ids[::-1]]) for lang in (first, second)]
        assert matrix[i, j] == matrix[j, i] == pytest.approx(linear_cka(*stacked))


def test_uriel_codes_and_similarity():
    assert uriel_code("en_ewt") == "eng"
    assert uriel_code("bxr_bdt") == "bxr"
    assert uriel_code("zz_xyz") is None
    with pytest.raises(ValueError, match="zz_xyz"):
        typological_similarity(["zz_xyz", "en_ewt"])

    codes, matrix = typological_similarity(["en_ewt", "de_gsd", "ja_gsd"])
    assert codes == ["en_ewt", "de_gsd", "ja_gsd"]
    assert np.allclose(np.diag(matrix), 1.0)
    assert np.allclose(matrix, matrix.T)

    folder = resources.files("lang2vec") / "data"
    with resources.as_file(folder / "feature_predictions.npz") as path:
        data = np.load(path, allow_pickle=True)
        langs, feats, values = [str(c) for c in data["langs"]], data["feats"], data["data"]
    syntax = [k for k, f in enumerate(feats) if str(f).startswith("S_")]
    eng, deu = (values[langs.index(c), syntax, 0].astype(float) for c in ("eng", "deu"))
    assert json.loads((folder / "letter_codes.json").read_text())["de"] == "deu"
    assert matrix[0, 1] == pytest.approx(eng @ deu / (np.linalg.norm(eng) * np.linalg.norm(deu)))
    assert matrix[0, 1] < 1 - 1e-6


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_mantel_exact_with_three_languages():
    # Over 3 distinct values the 6 relabellings give the 6 orderings of the 3 pairs, with Spearman
    # rho 1, 0.5, 0.5, -0.5, -0.5, -1. Observed rho = 1: |rho| >= 1 for 2 of 6, p = 1/3.
    overlap = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]])
    similar = np.array([[1, 0.1, 0.2], [0.1, 1, 0.9], [0.2, 0.9, 1]])
    result = overlap_typology_correlation(["a", "b", "c"], overlap, similar)
    assert result["rho"] == pytest.approx(1.0)
    assert result["p"] == pytest.approx(1 / 3)
    assert result["pairs"] == 3 and result["permutations"] == 6

    # Pairs (ab, ac, bc) with similarity (0.2, 0.1, 0.9): ranks (2, 1, 3) against (1, 2, 3), rho = 0.5,
    # and every relabelling has |rho| >= 0.5, so p = 1.
    swapped = similar[np.ix_([0, 2, 1], [0, 2, 1])]
    upper = np.triu_indices(3, k=1)
    assert stats.spearmanr(overlap[upper], swapped[upper]).statistic == pytest.approx(0.5)
    result = overlap_typology_correlation(["a", "b", "c"], overlap, swapped)
    assert result["rho"] == pytest.approx(0.5)
    assert result["p"] == pytest.approx(1.0)

    with pytest.raises(ValueError):
        overlap_typology_correlation(["a", "b"], overlap[:2, :2], similar[:2, :2])
    constant = overlap_typology_correlation(["a", "b", "c"], np.ones((3, 3)), similar)
    assert math.isnan(constant["rho"]) and math.isnan(constant["p"])


def test_mantel_sampled_with_eight_languages():
    rng = np.random.default_rng(2)
    a, b = rng.random((8, 8)), rng.random((8, 8))
    overlap, similar = a + a.T, b + b.T
    names = list("abcdefgh")
    first = overlap_typology_correlation(names, overlap, similar, seed=3)
    again = overlap_typology_correlation(names, overlap, similar, seed=3)
    assert first["permutations"] == 10000 and first["pairs"] == 28
    assert first["p"] == again["p"]
    assert 1 / 10000 <= first["p"] <= 1
    upper = np.triu_indices(8, k=1)
    assert first["rho"] == pytest.approx(stats.spearmanr(overlap[upper], similar[upper]).statistic)
