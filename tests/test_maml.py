"""MAML: meta-gradients against finite differences, an independent first-order computation and
`higher`; masked inner loops; memory; the maml methods end to end."""

import copy
import gc
import json

import higher
import pytest
import torch
from conftest import crash_after_checkpoint, scores, tiny_config, tiny_transformer
from torch import nn

from subnets.data.batching import Collator, encode_words
from subnets.data.treebank import Sentence
from subnets.files import read_jsonl
from subnets.meta import MAML, MetaTask
from subnets.models.encoder import Encoder, train_subword_tokenizer
from subnets.models.parser import DependencyParser
from subnets.training.runner import Run, run


def sentence(words, heads):
    return Sentence("s", list(words), ["NOUN"] * len(words), heads, ["root"] + ["dep"] * (len(words) - 1))


@pytest.fixture(scope="module")
def episode():
    tokenizer = train_subword_tokenizer(["a b c d e f g h"] * 3, 50, 64)
    collator = Collator(tokenizer, 64)
    support = [sentence("abcd", [0, 1, 1, 2]), sentence("efg", [2, 0, 2])]
    query = [sentence("hgfe", [0, 1, 2, 3]), sentence("bad", [3, 3, 0])]
    return collator(support, encode_words(tokenizer, support)), collator(
        query, encode_words(tokenizer, query)
    )


def parser(attn="eager", seed=0):
    torch.manual_seed(seed)
    model = DependencyParser(
        Encoder(tiny_transformer(attn=attn)), arc_dim=16, label_dim=8, dropout=0.0, word_dropout=0.0
    )
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.double()


def group_of(name):
    return "encoder" if name.startswith("encoder.transformer") else "head"


def meta_gradient(maml, tasks):
    """The meta-gradient meta_step leaves in .grad (the outer optimizer does nothing: lr 0)."""
    optimizer = torch.optim.SGD(maml.net.parameters(), lr=0.0)
    maml.meta_step(tasks, optimizer)
    return {n: p.grad.clone() for n, p in maml.net.named_parameters() if p.grad is not None}


PROBES = [
    ("encoder.transformer.encoder.layer.0.attention.self.query.weight", (1, 2)),
    ("encoder.transformer.encoder.layer.1.output.dense.weight", (3, 5)),
    ("arc.weight", (0, 0)),
    ("label.linear.bias", (4,)),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_second_order_meta_gradient_matches_finite_differences(episode, attn):
    support, query = episode
    model = parser(attn)
    maml = MAML(
        model, inner_steps=2, inner_lr={"encoder": 0.05, "head": 0.1}, group_of=group_of, first_order=False
    )
    grads = meta_gradient(maml, [MetaTask(support, query)])

    def meta_loss():
        adapted, _ = maml.adapt(support)
        with maml._context():
            return float(maml.task_loss(adapted, query).detach())

    eps = 1e-6
    named = dict(model.named_parameters())

    def at(name, index, value):
        with torch.no_grad():
            named[name][index] = value
        return meta_loss()

    for name, index in PROBES:
        original = named[name][index].item()
        up, down = at(name, index, original + eps), at(name, index, original - eps)
        at(name, index, original)
        numeric = (up - down) / (2 * eps)
        assert grads[name][index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-10), name


def test_first_order_is_the_query_gradient_at_the_adapted_parameters(episode):
    support, query = episode
    model = parser()
    lrs = {"encoder": 0.05, "head": 0.1}
    maml = MAML(model, inner_steps=2, inner_lr=lrs, group_of=group_of, first_order=True)
    grads = meta_gradient(maml, [MetaTask(support, query)])

    # Independently: two plain SGD steps on a copy, then the query gradient there.
    clone = copy.deepcopy(model)
    for _ in range(2):
        clone.zero_grad()
        clone(support).loss.backward()
        with torch.no_grad():
            for name, p in clone.named_parameters():
                if p.grad is not None:
                    p -= lrs[group_of(name)] * p.grad
    clone.zero_grad()
    clone(query).loss.backward()
    for name, p in clone.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-9, atol=1e-12), name

    second = meta_gradient(MAML(model, inner_steps=2, inner_lr=lrs, group_of=group_of, first_order=False),
                           [MetaTask(support, query)])  # fmt: skip
    assert not torch.allclose(second[PROBES[0][0]], grads[PROBES[0][0]])  # the Jacobian term matters


def test_clipped_inner_steps_are_sgd_steps_with_the_clipped_support_gradient(episode):
    support, query = episode
    model = parser()
    lrs = {"encoder": 0.05, "head": 0.1}
    clip = 0.5
    maml = MAML(model, inner_steps=2, inner_lr=lrs, group_of=group_of, inner_clip_norm=clip)
    adapted, _ = maml.adapt(support)

    # Independently: two SGD steps on a copy, each with the gradient clipped by clip_grad_norm_.
    clone = copy.deepcopy(model)
    norms = []
    for _ in range(2):
        clone.zero_grad()
        clone(support).loss.backward()
        norms.append(float(nn.utils.clip_grad_norm_(clone.parameters(), clip)))
        with torch.no_grad():
            for name, p in clone.named_parameters():
                if p.grad is not None:
                    p -= lrs[group_of(name)] * p.grad
    assert min(norms) > clip  # both steps were clipped
    for name, p in clone.named_parameters():
        assert torch.allclose(adapted[name], p, rtol=1e-9, atol=1e-12), name
    unclipped, _ = MAML(model, inner_steps=2, inner_lr=lrs, group_of=group_of).adapt(support)
    assert not torch.allclose(unclipped[PROBES[0][0]], adapted[PROBES[0][0]])


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)


@pytest.mark.parametrize("first_order", [True, False])
def test_agrees_with_higher_on_the_same_model_and_episode(first_order):
    torch.manual_seed(0)
    model = Regressor().double()
    generator = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(2):
        xs, ys = (
            torch.randn(6, 4, generator=generator, dtype=torch.float64),
            torch.randn(6, generator=generator, dtype=torch.float64),
        )
        tasks.append(((xs[:3], ys[:3]), (xs[3:], ys[3:])))
    lrs = {"body": 0.3, "head": 0.5}

    def loss(run, batch):
        x, y = batch
        return ((run(x) - y) ** 2).mean()

    maml = MAML(model, inner_steps=3, inner_lr=lrs, group_of=lambda n: n.split(".")[0],
                first_order=first_order, loss=loss)  # fmt: skip
    ours = meta_gradient(maml, [MetaTask(s, q) for s, q in tasks])

    reference = copy.deepcopy(model)
    inner = torch.optim.SGD([{"params": reference.body.parameters(), "lr": lrs["body"]},
                             {"params": reference.head.parameters(), "lr": lrs["head"]}])  # fmt: skip
    reference.zero_grad()
    for (xs, ys), (xq, yq) in tasks:
        with higher.innerloop_ctx(reference, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):  # fmt: skip
            for _ in range(3):
                diffopt.step(((fmodel(xs) - ys) ** 2).mean())
            query = ((fmodel(xq) - yq) ** 2).mean() / len(tasks)
            if first_order:  # higher without higher-order tracking: gradient at the adapted weights
                grads = torch.autograd.grad(query, list(fmodel.parameters()))
                for p, g in zip(reference.parameters(), grads):
                    p.grad = g if p.grad is None else p.grad + g
            else:
                query.backward()
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-8, atol=1e-12), name


def test_masked_inner_and_outer_steps_leave_other_coordinates_alone(episode):
    support, query = episode
    model = parser()
    maml = MAML(model, inner_steps=2, inner_lr={"encoder": 0.05, "head": 0.1}, group_of=group_of)
    name = "encoder.transformer.encoder.layer.0.attention.self.query.weight"
    mask = torch.zeros_like(dict(model.named_parameters())[name], dtype=torch.bool)
    mask[:8] = True  # head 0 only
    initial = maml.parameters_to_adapt()
    adapted, _ = maml.adapt(support, initial, update_mask={name: mask})
    assert torch.equal(adapted[name][~mask], initial[name][~mask])
    assert not torch.equal(adapted[name][mask], initial[name][mask])

    from subnets.optim import MaskedOptimizer

    optimizer = MaskedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1), model.named_parameters()
    )
    before = dict(model.named_parameters())[name].detach().clone()
    other = MetaTask(support, query, update_mask={name: torch.zeros_like(mask)})  # owns nothing of it
    maml.meta_step([MetaTask(support, query, update_mask={name: mask}), other], optimizer)
    after = dict(model.named_parameters())[name]
    assert torch.equal(after[~mask], before[~mask])  # outside every task's mask: bit-identical
    assert not torch.equal(after[mask], before[mask])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects touches deprecated torch objects
def test_memory_does_not_grow_over_meta_steps(episode):
    support, query = episode
    model = parser()
    maml = MAML(
        model, inner_steps=2, inner_lr={"encoder": 0.01, "head": 0.05}, group_of=group_of, first_order=False
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(3):
        maml.meta_step([MetaTask(support, query), MetaTask(query, support)], optimizer)
    counts = []
    for _ in range(3):
        for _ in range(10):
            maml.meta_step([MetaTask(support, query), MetaTask(query, support)], optimizer)
        counts.append(live_tensors())
    assert counts[0] == counts[1] == counts[2], counts


def test_second_order_refuses_attention_without_double_backward():
    model = parser()
    model.encoder.transformer.config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        ValueError, match=r"double backward.*flash_attention_2.*model.attn_implementation=eager"
    ):
        MAML(model, first_order=False)
    MAML(model, first_order=True)  # first order needs no double backward
    with pytest.raises(ValueError, match="positive"):
        MAML(parser(), inner_lr={"encoder": 0.0, "head": 0.1}, group_of=group_of)


def test_meta_sgd_learns_the_inner_rates(episode):
    support, query = episode
    model = parser()
    maml = MAML(model, inner_lr={"encoder": 0.01, "head": 0.05}, group_of=group_of, learn_inner_lr=True)
    optimizer = torch.optim.Adam([*model.parameters(), *maml.log_inner_lr.values()], lr=1e-2)
    before = {g: float(v.detach()) for g, v in maml.log_inner_lr.items()}
    for _ in range(5):
        maml.meta_step([MetaTask(support, query)], optimizer)
    assert all(float(maml.log_inner_lr[g].detach()) != before[g] for g in before)


META = ["train.steps=12", "meta.support_size=4", "meta.query_size=4"]


def test_maml_run_learns(tmp_path):
    settings = [*META, "+method=maml", "train.steps=60", "train.log_every=10", "train.eval_every=60",
                "meta.languages_per_episode=2", "meta.support_size=8", "meta.query_size=8"]  # fmt: skip
    results = run(tiny_config(*settings), tmp_path)
    losses = [r["train/query"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/query" in r]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    assert results["method"] == "maml"


@pytest.mark.parametrize("method", ["maml_static", "maml_dynamic"])
def test_masked_meta_methods_run_and_respect_masks(tmp_path, method):
    extra = ["masks.finetune_steps=2", "masks.selection=keep_ratio", "masks.importance_batches=1", "masks.batch_size=4",
             "dynamic.update_every=3"]  # fmt: skip
    experiment = Run(tiny_config(*META, f"+method={method}", *extra), tmp_path)
    experiment.setup()
    method_object, model = experiment.method.policy, experiment.model
    try:
        from subnets.masks.subnetwork import unit_parameter_masks

        for _ in range(6):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            masks = {lang: s.unit_mask.clone() for lang, s in method_object.masks.items()}
            experiment.train_step()
            # heads outside every language's subnetwork did not move (the union of the episode)
            union = torch.zeros_like(next(iter(masks.values())))
            for mask in masks.values():
                union |= mask
            for name, owned in unit_parameter_masks(model, union).items():
                assert torch.equal(dict(model.named_parameters())[name][~owned], before[name][~owned]), name
        if method == "maml_dynamic":
            assert any(h["changed"] for entries in method_object.history.values() for h in entries[1:])
            assert method_object.rule.ema.averages  # importance came from the query losses' gate gradients
    finally:
        experiment.close()


def test_maml_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    settings = [*META, "+method=maml", "meta.learn_inner_lr=true"]
    reference = run(tiny_config(*settings), tmp_path / "reference")
    crash_after_checkpoint(monkeypatch, tiny_config(*settings), tmp_path / "resumed")
    assert scores(run(tiny_config(*settings), tmp_path / "resumed")) == scores(reference)
    lrs = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/inner_lr_encoder" in r for r in lrs)
