"""The few-shot protocol for unseen languages, and its support-sentence sampling rule.

``k`` support sentences of a language come from its train split, else its dev split, else its
test file: the first of these that holds at least ``k`` sentences. When they come from the
split being evaluated, they are removed from it, so a support sentence is never scored.
"""

from __future__ import annotations

import copy
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from subnets.data.dataset import LanguageData, load_language
from subnets.data.ud import SPLITS, TreebankFiles
from subnets.evaluate import evaluate
from subnets.optim.masked import MaskedOptimizer
from subnets.training import parameter_groups, training_step

if TYPE_CHECKING:
    from subnets.experiment import Experiment


def support_split(treebank: TreebankFiles, k: int, sizes: dict[str, int] | None = None) -> str:
    """The split support sentences are drawn from: train, else dev, else test, the first with
    at least ``k`` sentences (``sizes`` gives split sizes when known; else files are read)."""
    found = {}
    for split in SPLITS:
        if split not in treebank.files:
            continue
        found[split] = (
            sizes[split] if sizes and split in sizes else len(load_language(treebank, split).sentences)
        )
        if found[split] >= k:
            return split
    listed = ", ".join(f"{split} ({n} sentences)" for split, n in found.items()) or "none"
    raise ValueError(
        f"{treebank.code}: no split holds k={k} sentences for few-shot support (fewshot.k); splits: {listed} "
        "(languages.max_eval_sentences, if set, caps the evaluated split)"
    )


def check_support(treebank: TreebankFiles, evaluated: LanguageData, k: int) -> str:
    """The split ``k`` support sentences for ``evaluated``'s language come from; raises if
    drawing them from the evaluated split itself would leave nothing to score."""
    split = support_split(treebank, k, {evaluated.split: len(evaluated)})
    if split == evaluated.split and len(evaluated) <= k:
        raise ValueError(
            f"{treebank.code}: the k={k} few-shot support sentences (fewshot.k) come from its {split} "
            f"split, which is also the one scored, and it holds only {len(evaluated)} sentences: none "
            "would be left to score (lower fewshot.k, or raise languages.max_eval_sentences if set)"
        )
    return split


def draw_support(
    treebank: TreebankFiles, evaluated: LanguageData, k: int, seed: int, on_error: str = "raise"
) -> tuple[LanguageData, LanguageData]:
    """Draw ``k`` support sentences for ``evaluated``'s language; returns (support, evaluated
    data without the support sentences). Deterministic for (seed, language)."""
    split = check_support(treebank, evaluated, k)
    pool = evaluated if split == evaluated.split else load_language(treebank, split, on_error)
    rng = np.random.default_rng([seed, zlib.crc32(treebank.code.encode())])
    chosen = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    support = pool.subset(chosen, split)
    if pool is not evaluated:
        return support, evaluated
    taken = set(chosen)
    return support, evaluated.subset([i for i in range(len(evaluated)) if i not in taken])


def fine_tune(
    model: torch.nn.Module,
    batch,
    steps: int,
    lr_encoder: float,
    lr_head: float,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    gates: torch.Tensor | None = None,
    update_mask: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """``steps`` AdamW steps of ``model`` (in place) on one ``batch``, through a masked optimizer
    when ``update_mask`` is given."""
    optimizer = MaskedOptimizer(
        torch.optim.AdamW(parameter_groups(model, lr_encoder, lr_head, weight_decay)),
        model.named_parameters(),
    )
    for _ in range(steps):
        training_step(model, batch, optimizer, gates=gates, update_mask=update_mask, clip_norm=clip_norm)
    return model


def few_shot(experiment: Experiment) -> dict[str, Any]:
    """The few-shot protocol on the target languages (``fewshot.*``), shared by every method.

    For each target language and repetition ``r`` (seed ``1000 * seed + r``): draw ``k``
    support sentences (:func:`draw_support`), fine-tune a copy of the model on them for
    ``steps`` steps with the method's test-time adaptation (its mask policy: forward gates
    and/or update mask), and score the test set without the support sentences. Returns per
    language the runs and the mean and standard deviation (ddof 1) of UAS and LAS; the
    predictions of repetition 0 go to ``predictions/fewshot/<code>-test.conllu``.
    """
    cfg, settings = experiment.cfg, experiment.cfg.fewshot
    out: dict[str, Any] = {
        "k": settings.k,
        "steps": settings.steps,
        "repetitions": settings.repetitions,
        "languages": {},
    }
    if settings.repetitions <= 0:
        return out
    for code, test in experiment.target_test.items():
        runs = []
        for repetition in range(settings.repetitions):
            seed = 1000 * cfg.seed + repetition
            support, rest = draw_support(
                experiment.treebanks[code],
                test,
                settings.k,
                seed,
                str(getattr(cfg.languages.on_error, "value", "raise")),
            )
            if support.pieces is None:
                support.tokenize(experiment.tokenizer)
            model = copy.deepcopy(experiment.model)
            with torch.random.fork_rng(
                devices=[experiment.device] if experiment.device.type == "cuda" else []
            ):
                torch.manual_seed(seed)
                gates, update_mask = experiment.method.adaptation(experiment, model, code, support)
                batch = experiment.collator(support.sentences, support.pieces, code).to(experiment.device)
                fine_tune(model, batch, settings.steps, settings.lr_encoder, settings.lr_head,
                          settings.weight_decay, cfg.train.clip_norm, gates, update_mask)  # fmt: skip
            path = (
                experiment.run_dir / "predictions" / "fewshot" / f"{code}-test.conllu"
                if repetition == 0
                else None
            )
            scores = evaluate(model, rest, experiment.collator, cfg.train.eval_batch_size, gates, path)
            runs.append({"seed": seed, "support_split": support.split, **scores})
            del model
        summary = {"runs": runs, "support_split": runs[0]["support_split"]}
        for key in ("uas", "las", "upos"):
            if key in runs[0]:
                values = np.array([run[key] for run in runs])
                summary[f"{key}_mean"] = float(values.mean())
                summary[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out["languages"][code] = summary
    languages = out["languages"].values()
    out["mean"] = {key: float(np.mean([s[f"{key}_mean"] for s in languages]))
                   for key in ("uas", "las", "upos") if f"{key}_mean" in next(iter(languages))}  # fmt: skip
    return out
