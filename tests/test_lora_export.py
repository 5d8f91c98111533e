"""Subnetworks exported as peft LoRA adapters (subnets.masks.lora).

Tiny BERT token classifiers, Qwen2 decoders with grouped-query attention (4 query heads, 2
key-value heads) and a GPT-2 (Conv1D projections, fused query-key-value rows), trained through two
languages' random subnetworks with only the subnetworks trainable (train_subnetworks_only, masked
AdamW steps): each language's adapter, loaded by peft on the untouched base model, computes what
the trained model computes under that language's gates (1e-10 in float64, 1e-5 in float32), alone
and in a batch mixing the languages; shared parameters that changed are refused by name; the ranks
are those counted by hand from the geometry.
"""

import copy
import json

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from subnets.masks.compact import train_subnetworks_only  # noqa: E402
from subnets.masks.core import gate_values  # noqa: E402
from subnets.masks.lora import lora_adapter, save_lora_adapters  # noqa: E402
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet  # noqa: E402
from subnets.models.gates import UnitGates  # noqa: E402
from subnets.optim.masked import MaskedOptimizer  # noqa: E402

VOCAB = 60
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny(family: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, num_labels=3, max_position_embeddings=32,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        model = transformers.BertForTokenClassification(config)
    elif family == "gpt2":  # Conv1D projections (transposed weights) with fused query, key and value rows
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:  # grouped-query attention: 4 query heads, 2 key-value heads of width 8; an untied head
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                          tie_word_embeddings=False)  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def batch(seed: int, size: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def train(model, subnetworks: dict[str, Subnetwork], apply: str, steps: int = 6) -> None:
    """Train the subnetworks alone, as SubnetworkModel does: one language per step, its gates in the
    forward pass (apply forward|both), its update mask in the step (apply gradient|both)."""
    parameters = train_subnetworks_only(model, subnetworks.values(), model.base_model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = MaskedOptimizer(
        torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.1), model.named_parameters()
    )
    languages = list(subnetworks)
    for step in range(steps):
        subnetwork = subnetworks[languages[step % len(languages)]]
        inputs = batch(100 + step)
        labels = inputs["input_ids"] % 3 if model.config.model_type == "bert" else inputs["input_ids"]
        optimizer.zero_grad()
        with model.gates.applied(gate_values(subnetwork, apply)):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step(update_mask=None if apply == "forward" else parameters.update_mask(subnetwork))


def setup(family: str, dtype: torch.dtype, apply: str, masks: dict[str, torch.Tensor] | None = None):
    """(trained model, base model, mask set): two random languages unless ``masks`` are given."""
    model = tiny(family, dtype)
    base = copy.deepcopy(model)
    model.gates = UnitGates(model.base_model, "both")
    if masks is None:
        generator = torch.Generator().manual_seed(7)
        masks = {lang: torch.rand(model.gates.shape, generator=generator) < 0.5 for lang in ("de", "fr")}
    subnetworks = {lang: Subnetwork(mask) for lang, mask in masks.items()}
    train(model, subnetworks, apply)
    mask_set = SubnetworkSet(model.gates.num_layers, model.gates.units)
    for lang, subnetwork in subnetworks.items():
        mask_set[lang] = subnetwork
    return model, base, mask_set


def logits(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


def lora_modules(model) -> dict[str, dict[str, int]]:
    """The modules peft put a LoRA in, by their names in the base model: adapter -> rank."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            found[name] = {adapter: r for adapter, r in module.r.items()}
    return found


CASES = [("bert", torch.float64, "both"), ("bert", torch.float64, "gradient"), ("bert", torch.float64, "forward"),
         ("qwen2", torch.float64, "both"), ("qwen2", torch.float32, "both"), ("qwen2", torch.float32, "gradient"),
         ("gpt2", torch.float64, "both")]  # fmt: skip
HEAD = {"bert": ["classifier"], "qwen2": ["lm_head"], "gpt2": None}  # GPT-2's head is tied to the embedding


def case_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


@pytest.mark.parametrize("family,dtype,apply", CASES, ids=case_id)
def test_each_language_adapter_computes_the_trained_model_under_its_gates(tmp_path, family, dtype, apply):
    trained, base, masks = setup(family, dtype, apply)
    ranks = save_lora_adapters(trained, base, masks, trained.gates, apply, tmp_path)
    assert json.loads((tmp_path / "ranks.json").read_text()) == ranks and set(ranks) == {"de", "fr"}
    inputs = batch(1)
    base_out = logits(base, inputs)
    outputs = {}
    for lang in masks:
        with trained.gates.applied(gate_values(masks[lang], apply)):
            expected = logits(trained, inputs)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / lang).eval()
        got = logits(loaded, inputs)
        assert got.dtype == dtype
        difference = float((got - expected).abs().max())
        print(
            f"{family} {dtype} apply={apply} {lang}: max |peft - trained| = {difference:.3g}, rank {ranks[lang]}"
        )
        assert difference < TOLERANCE[dtype], (lang, difference)
        assert float((expected - base_out).abs().max()) > 1e3 * TOLERANCE[dtype]  # the adapter does something
        # in peft's own words: a LoRA of its rank where the config says, the state dict as peft writes it
        config = loaded.peft_config["default"]
        wrapped = lora_modules(loaded)
        assert set(wrapped) == set(config.target_modules)
        assert {m: r["default"] for m, r in wrapped.items()} == {m: config.rank_pattern[m.replace(".", r"\.")]
                                                                 for m in wrapped}  # fmt: skip
        assert sum(r["default"] for r in wrapped.values()) == ranks[lang]
        assert config.modules_to_save == HEAD[family]
        written = lora_adapter(trained, base, trained.gates, gate_values(masks[lang], apply))[1]
        saved = peft.get_peft_model_state_dict(loaded)
        assert set(saved) == set(written)
        assert all(torch.equal(saved[k], written[k]) for k in saved)
        outputs[lang] = expected
    languages_differ = float((outputs["de"] - outputs["fr"]).abs().max()) > 1e3 * TOLERANCE[dtype]
    # under apply=gradient every language computes with the whole model
    assert languages_differ == (apply != "gradient")


@pytest.mark.parametrize("family,dtype", [("bert", torch.float64), ("qwen2", torch.float32)], ids=case_id)
def test_a_mixed_batch_gives_each_example_its_own_language(tmp_path, family, dtype):
    trained, base, masks = setup(family, dtype, "both")
    save_lora_adapters(trained, base, masks, trained.gates, "both", tmp_path)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "de", adapter_name="de").eval()
    served.load_adapter(tmp_path / "fr", adapter_name="fr")
    inputs = batch(2)
    order = ["fr", "de", "fr", "de"]
    got = logits(served, inputs, adapter_names=order)
    for i, lang in enumerate(order):
        with trained.gates.applied(gate_values(masks[lang], "both")):
            expected = logits(trained, inputs)[i]
        difference = float((got[i] - expected).abs().max())
        print(f"{family} {dtype} mixed batch, example {i} ({lang}): max |peft - trained| = {difference:.3g}")
        assert difference < TOLERANCE[dtype], (i, lang, difference)
    # and each example's gates are its own language's: the other language's output is far off
    with trained.gates.applied(gate_values(masks["de"], "both")):
        assert float((logits(trained, inputs)[0] - got[0]).abs().max()) > 1e3 * TOLERANCE[dtype]


SHARED = ["bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.1.output.LayerNorm.weight",
          "bert.embeddings.word_embeddings.weight"]  # fmt: skip


@pytest.mark.parametrize("name", SHARED)
def test_a_changed_shared_parameter_is_refused_by_name(name):
    base = tiny("bert", torch.float64)
    trained = copy.deepcopy(base)
    gates = UnitGates(trained.base_model, "both")
    with torch.no_grad():
        trained.get_parameter("classifier.weight").add_(0.5)  # a task head: allowed
        trained.get_parameter("bert.encoder.layer.0.attention.self.query.weight")[3].add_(0.5)  # an owned row
    config, state = lora_adapter(trained, base, gates)
    assert config.modules_to_save == ["classifier"] and config.target_modules == {
        "bert.encoder.layer.0.attention.self.query"}  # fmt: skip
    with torch.no_grad():
        trained.get_parameter(name).view(-1)[5] += 1e-3
    with pytest.raises(
        ValueError, match=f"cannot export as LoRA adapters: {name.replace('.', '[.]')} changed"
    ):
        lora_adapter(trained, base, gates)


def one_language(shape, heads: dict[int, list[int]], neurons: dict[int, list[int]], num_heads: int):
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, kept in heads.items():
        mask[layer, kept] = True
    for layer, kept in neurons.items():
        mask[layer, [num_heads + j for j in kept]] = True
    return mask


# Hand counts (module docstring: changed rows or columns plus gated-off columns). BERT: hidden 32, 4 heads of
# width 8, 64 neurons; the language keeps head 1 of layer 0 and neurons 3 and 7 of layer 1.
#   gradient: query, key, value rows of head 1 in layer 0: 3 x 8; its attention-output columns: 8; neurons 3, 7:
#   2 rows of layer 1's intermediate projection, 2 columns of its output projection: 24 + 8 + 2 + 2 = 36.
#   both: + the gated-off columns: layer 0's attention output 8 + 24, its feed-forward output 64 (no neuron kept),
#   layer 1's attention output 32 (no head kept), its feed-forward output 62 + 2: 24 + 32 + 64 + 32 + 2 + 64 = 218.
# Qwen2: hidden 32, 4 query heads of width 8 in 2 key-value groups ({0, 1}, {2, 3}), 48 neurons; the language keeps
# heads 0 and 1 of layer 0 (one key-value head) and neuron 5 of layer 1.
#   gradient: q rows 16, k rows 8, v rows 8, o columns 16; gate and up rows 1 + 1, down column 1: 48 + 3 = 51.
#   both: q, k, v 32; layer 0's o 16 + 16, down 48; layer 1's o 32, gate and up 2, down 47 + 1: 194.
HAND = [("bert", "gradient", 36), ("bert", "both", 218), ("qwen2", "gradient", 51), ("qwen2", "both", 194)]


@pytest.mark.parametrize("family,apply,expected", HAND)
def test_ranks_are_the_hand_counts(tmp_path, family, apply, expected):
    heads = {0: [1]} if family == "bert" else {0: [0, 1]}
    neurons = {1: [3, 7]} if family == "bert" else {1: [5]}
    shape = UnitGates(tiny(family, torch.float64).base_model, "both").shape
    mask = one_language(shape, heads, neurons, num_heads=4)
    trained, base, masks = setup(family, torch.float64, apply, {"xx": mask})
    ranks = save_lora_adapters(trained, base, masks, trained.gates, apply, tmp_path)
    assert ranks == {"xx": expected}
    with trained.gates.applied(gate_values(masks["xx"], apply)):
        expected_out = logits(trained, batch(3))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "xx").eval()
    assert float((logits(loaded, batch(3)) - expected_out).abs().max()) < 1e-10


def test_bad_gate_rows_and_apply_are_refused(tmp_path):
    trained, base, masks = setup("bert", torch.float64, "both")
    with pytest.raises(ValueError, match="gate_row must be one row of gates per layer"):
        lora_adapter(trained, base, trained.gates, torch.ones(3, *trained.gates.shape))
    with pytest.raises(ValueError, match="apply must be one of"):
        save_lora_adapters(trained, base, masks, trained.gates, "sideways", tmp_path)
