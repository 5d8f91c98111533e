"""Real data and the real encoder from ../shared (CI sets SUBNETS_UD_ROOT and SUBNETS_E5_PATH)."""

import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from subnets.data.batching import Collator
from subnets.data.dataset import load_language
from subnets.data.discovery import SPLITS, discover_languages
from subnets.data.treebank import read_conllu
from subnets.models.encoder import Encoder, load_pretrained, max_subwords
from subnets.models.parser import DependencyParser
from subnets.tasks import Parsing

UD_ROOT = Path(os.environ.get("SUBNETS_UD_ROOT", SHARED / "data" / "ud"))
E5_PATH = Path(os.environ.get("SUBNETS_E5_PATH", SHARED / "models" / "multilingual-e5-small"))
needs_ud = pytest.mark.skipif(
    not UD_ROOT.is_dir(), reason=f"real UD data not found at {UD_ROOT} (set SUBNETS_UD_ROOT)"
)
needs_e5 = pytest.mark.skipif(
    not (E5_PATH / "config.json").exists(),
    reason=f"multilingual-e5-small not found at {E5_PATH} (set SUBNETS_E5_PATH)",
)
pytestmark = pytest.mark.shared
# The UD study's languages (configs/languages/ud.yaml; its manifest's test treebanks are these targets)
UD_SOURCES = {"en_ewt", "it_isdt", "no_nynorsk", "ko_kaist", "ar_pud", "cs_pud", "ru_pud", "hi_pud"}
UD_TARGETS = {"br_keb", "bxr_bdt", "kk_ktb", "hsb_ufal", "fi_tdt", "de_gsd", "hu_szeged", "fa_seraji"}


@needs_ud
def test_every_shared_treebank_loads_and_validates():
    treebanks = discover_languages(UD_ROOT)
    expected = {p.name for p in UD_ROOT.iterdir() if p.is_dir()}
    assert set(treebanks) == expected and len(expected) >= 18
    for code, treebank in treebanks.items():
        assert treebank.files, code
        for split in SPLITS:
            if split in treebank.files:
                file = read_conllu(treebank.files[split], on_error="raise")
                assert file.num_words > 0 and not file.skipped, (code, split)


@needs_ud
@needs_e5
def test_e5_small_forward_backward_on_real_batches():
    transformer, tokenizer = load_pretrained(str(E5_PATH))
    assert transformer.config.num_hidden_layers == 12 and transformer.config.num_attention_heads == 12
    model = DependencyParser(Encoder(transformer), "parsing_pos", arc_dim=64, label_dim=32)
    assert model.gates.shape == (12, 12)
    collator = Collator(tokenizer, max_subwords(transformer, tokenizer))
    for code in ("ko_kaist", "ar_pud"):
        data = load_language(discover_languages(UD_ROOT)[code], "dev", Parsing(), max_examples=8).tokenize(
            tokenizer
        )
        batch = collator(data.examples, data.pieces, code)
        assert batch.num_words == data.num_words
        gates = torch.ones(model.gates.shape, requires_grad=True)
        with model.gates.applied(gates):
            out = model(batch)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert gates.grad.abs().sum() > 0
        layer0 = model.encoder.transformer.encoder.layer[0].attention.self.query.weight
        assert layer0.grad is not None and layer0.grad.abs().sum() > 0
        model.zero_grad()
