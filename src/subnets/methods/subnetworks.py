"""Methods with language-specific subnetworks.

A step of language ``l`` runs and updates through ``l``'s subnetwork according to
``method.apply``:

* ``forward``: heads outside the subnetwork are gated off (gate 0) in the forward pass; the
  update is the optimizer's ordinary step (their gradients are zero, but weight decay and
  momentum may still move them);
* ``gradient``: the full model runs; the update is exact-masked (:class:`MaskedOptimizer`):
  nothing outside the subnetwork moves;
* ``both``: gated forward and exact-masked update.

Parameters no head owns (embeddings, feed-forward, LayerNorm, the task heads) are shared by all
languages unless unstructured parameter masks cover them.

Unseen (development and target) languages get a subnetwork by ``masks.target_policy``:
``full`` (no mask), ``support`` (heads selected from importance on the language's k support
sentences, keeping the source languages' mean share of heads) or ``nearest`` (the mask of the
source language whose importance scores have the highest cosine similarity with the
support-estimated scores).
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from subnets.evaluate import evaluate
from subnets.files import atomic_write_json
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA, reselect
from subnets.masks.importance import head_importance
from subnets.masks.search import find_subnetwork, matching_parameters
from subnets.masks.selection import select_keep_ratio
from subnets.masks.subnetwork import Subnetwork, SubnetworkSet, head_parameter_masks
from subnets.methods.base import Method, setting
from subnets.optim.masked import MaskedOptimizer
from subnets.training import StepResult, parameter_groups, training_step

if TYPE_CHECKING:
    from subnets.data.dataset import LanguageData
    from subnets.experiment import Experiment

log = logging.getLogger(__name__)


def language_batches(
    experiment: Experiment, data: LanguageData, size: int, count: int, salt: str = ""
) -> list:
    """``count`` batches of ``size`` sentences of ``data``, in a fixed shuffled order (seeded by
    the run's seed and the language)."""
    rng = np.random.default_rng([experiment.cfg.seed, zlib.crc32(f"{data.code}/{salt}".encode())])
    order = [int(i) for i in rng.permutation(len(data))]
    while len(order) < size * count:
        order += order
    batches = []
    for b in range(count):
        chunk = order[b * size : (b + 1) * size]
        batch = experiment.collator(
            [data.sentences[i] for i in chunk], [data.pieces[i] for i in chunk], data.code
        )
        batches.append(batch.to(experiment.device))
    return batches


class SubnetworkMethod(Method):
    """Shared by the subnetwork methods: holds the masks and applies them per ``method.apply``."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.mode = setting(cfg.method.apply)
        self.settings = cfg.masks
        self.masks: SubnetworkSet | None = None
        self.target_masks: dict[str, Subnetwork] = {}
        self.nearest: dict[str, str] = {}
        self.model = None
        self._update_masks: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def needs_support(self) -> bool:
        return setting(self.settings.target_policy) != "full"

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module
    ) -> torch.optim.Optimizer:
        self.model = model
        return MaskedOptimizer(optimizer, model.named_parameters())

    def subnetwork(self, lang: str) -> Subnetwork | None:
        """The subnetwork of a training language, or of an unseen one under the test-time policy."""
        if self.masks is not None and lang in self.masks:
            return self.masks[lang]
        return self.target_masks.get(lang)

    def gates_of(self, subnetwork: Subnetwork | None) -> torch.Tensor | None:
        if subnetwork is None or self.mode == "gradient":
            return None
        return subnetwork.head_mask.float().to(self._device())

    def update_mask_of(self, subnetwork: Subnetwork | None) -> dict[str, torch.Tensor] | None:
        if subnetwork is None or self.mode == "forward":
            return None
        masks = head_parameter_masks(self.model, subnetwork.head_mask.to(self._device()))
        for name, mask in subnetwork.param_masks.items():
            masks[name] = mask.to(self._device())
        return masks

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def head_gates(self, lang: str) -> torch.Tensor | None:
        return self.gates_of(self.subnetwork(lang))

    def update_mask(self, lang: str) -> dict[str, torch.Tensor] | None:
        if lang not in self._update_masks:
            self._update_masks[lang] = self.update_mask_of(self.subnetwork(lang))
        return self._update_masks[lang]

    def eval_gates(self, lang: str) -> torch.Tensor | None:
        return self.gates_of(self.subnetwork(lang))

    def set_masks(self, masks: SubnetworkSet) -> None:
        self.masks = masks
        self._update_masks.clear()

    # ---------------------------------------------------------------- unseen languages
    def prepare_evaluation(self, experiment: Experiment) -> None:
        """Subnetworks of the development and target languages by the test-time policy, from
        their support sentences and the current model."""
        self.target_masks.clear()
        self._update_masks = {k: v for k, v in self._update_masks.items() if k in (self.masks or {})}
        for code, support in experiment.support.items():
            subnetwork = self.policy_subnetwork(experiment, experiment.model, code, support)
            if subnetwork is not None:
                self.target_masks[code] = subnetwork

    def policy_subnetwork(
        self, experiment: Experiment, model: torch.nn.Module, code: str, support: LanguageData
    ) -> Subnetwork | None:
        """The subnetwork of unseen language ``code`` by ``masks.target_policy`` (module docstring)."""
        policy = setting(self.settings.target_policy)
        if policy == "full":
            return None
        size = self.settings.batch_size
        batches = language_batches(experiment, support, size, max(1, -(-len(support) // size)), "support")
        scores = head_importance(model, batches)
        if policy == "support":
            keep = float(np.mean([s.head_mask.float().mean() for s in self.masks.values()]))
            return Subnetwork(
                select_keep_ratio(scores, keep, self.settings.min_heads_per_layer), scores=scores
            )
        similarity = {
            source: float(torch.nn.functional.cosine_similarity(scores.flatten(), s.scores.flatten(), dim=0))
            for source, s in self.masks.items()
            if s.scores is not None
        }
        if not similarity:
            raise ValueError("target_policy=nearest needs the source masks' importance scores")
        source = max(similarity, key=similarity.get)
        self.nearest[code] = source
        chosen = self.masks[source]
        return Subnetwork(chosen.head_mask, chosen.param_masks, scores)

    def adaptation(self, experiment: Experiment, model: torch.nn.Module, lang: str, support: LanguageData):
        subnetwork = self.policy_subnetwork(experiment, model, lang, support)
        return self.gates_of(subnetwork), self.update_mask_of(subnetwork)

    # ---------------------------------------------------------------- outputs and state
    def write_summary(self, experiment: Experiment) -> None:
        """Masks, sparsity, overlap matrix and heatmap into ``<run>/masks/``; logged to W&B."""
        folder = experiment.run_dir / "masks"
        folder.mkdir(parents=True, exist_ok=True)
        self.masks.save(folder / "masks.safetensors")
        languages, overlap = self.masks.jaccard()
        summary = {
            "sparsity": self.masks.sparsity(),
            "jaccard": {"languages": languages, "matrix": overlap.tolist()},
        }
        atomic_write_json(folder / "summary.json", summary)
        figure = self.masks.overlap_figure()
        figure.savefig(folder / "overlap.png", dpi=120)
        experiment.log(
            {f"masks/{lang}/sparsity": s["sparsity"] for lang, s in summary["sparsity"].items()},
            images={"masks/overlap": figure},
        )
        import matplotlib.pyplot as plt

        plt.close(figure)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.masks is not None:
            out["sparsity"] = {lang: s.sparsity() for lang, s in self.masks.items()}
        if self.target_masks:
            out["target_sparsity"] = {lang: s.sparsity() for lang, s in self.target_masks.items()}
        if self.nearest:
            out["nearest"] = dict(self.nearest)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"masks": None if self.masks is None else self.masks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("masks") is not None:
            shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()} if self.model else None
            self.set_masks(SubnetworkSet.from_state_dict(state["masks"], shapes))


class StaticSubnetworks(SubnetworkMethod):
    """Per-language masks computed once, before multilingual training (``+method=static``).

    For each source language: optionally fine-tune a copy of the model briefly on it
    (``masks.finetune_steps``), score heads (``masks.importance``) and select a mask
    (``masks.selection``; iterative pruning uses the language's dev split). The masks are
    cached in ``<run>/masks/masks.safetensors``; ``masks.path`` reuses a saved set.
    """

    name = "static"

    def setup(self, experiment: Experiment) -> None:
        self.model = experiment.model
        if self.masks is None:
            self.set_masks(self._obtain_masks(experiment))
            self.write_summary(experiment)
        missing = [lang for lang in experiment.train_data if lang not in self.masks]
        if missing:
            raise ValueError(f"the mask set has no subnetwork for training language(s) {', '.join(missing)} "
                             f"(it has: {', '.join(self.masks)}); set masks.path to a set that covers them")  # fmt: skip

    def _obtain_masks(self, experiment: Experiment) -> SubnetworkSet:
        cached = experiment.run_dir / "masks" / "masks.safetensors"
        path = self.settings.path or (cached if cached.exists() else None)
        if path:
            log.info("loading subnetworks from %s", path)
            return SubnetworkSet.load(path, expect=experiment.model)
        return self.compute_masks(experiment)

    def compute_masks(self, experiment: Experiment) -> SubnetworkSet:
        """Find every training language's subnetwork (the procedure in the class docstring)."""
        settings, train = self.settings, experiment.cfg.train
        model = experiment.model
        masks = SubnetworkSet.for_model(model)
        param_names = (
            matching_parameters(model, settings.param_include) if setting(settings.params) == "fisher" else []
        )
        needs_samples = setting(settings.importance) == "fisher" or param_names
        history = {}
        for lang, data in experiment.train_data.items():
            dev = experiment.eval_data.get(("source", lang))
            if setting(settings.selection) == "iterative" and dev is None:
                raise ValueError(f"masks.selection=iterative needs a dev split for training language {lang}; "
                                 "use masks.selection=keep_ratio or top_k")  # fmt: skip

            def dev_metric(scorer, mask, dev=dev):
                scores = evaluate(
                    scorer,
                    dev,
                    experiment.collator,
                    train.eval_batch_size,
                    mask.float().to(experiment.device),
                )
                return experiment.validation_metric(scores)

            search = find_subnetwork(
                model,
                language_batches(
                    experiment, data, settings.batch_size, settings.importance_batches, "importance"
                ),
                importance=setting(settings.importance),
                selection=setting(settings.selection),
                dev_metric=dev_metric,
                keep_ratio=settings.keep_ratio,
                top_k=settings.top_k,
                prune_fraction=settings.prune_fraction,
                threshold=settings.threshold,
                min_heads_per_layer=settings.min_heads_per_layer,
                samples=language_batches(experiment, data, 1, settings.param_samples, "fisher")
                if needs_samples
                else None,
                finetune_batches=language_batches(experiment, data, train.batch_size, 8, "finetune"),
                finetune_steps=settings.finetune_steps,
                make_optimizer=lambda m: torch.optim.AdamW(
                    parameter_groups(m, train.lr_encoder, train.lr_head, train.weight_decay)
                ),
                param_names=param_names,
                param_keep_ratio=settings.param_keep_ratio,
                param_scope=setting(settings.param_scope),
            )
            search.subnetwork.scores = search.importance
            masks[lang] = search.subnetwork
            if search.pruning is not None:
                history[lang] = {"baseline": search.pruning.baseline, "rounds": search.pruning.history,
                                 "stopped_by": search.pruning.stopped_by}  # fmt: skip
            log.info(
                "%s: kept %d of %d heads",
                lang,
                search.subnetwork.num_heads_kept,
                search.subnetwork.head_mask.numel(),
            )
        if history:
            folder = experiment.run_dir / "masks"
            atomic_write_json(folder / "pruning.json", history)
            log.info("pruning history: %s", json.dumps(history))
        return masks


class DynamicSubnetworks(StaticSubnetworks):
    """Masks updated jointly with the model (``+method=dynamic``).

    Initial masks come from the static procedure (``dynamic.init=static``) or keep every head
    (``full``). Every ``dynamic.update_every`` steps each language's mask is re-selected
    (:func:`~subnets.masks.dynamic.reselect`, minimum heads per layer as ``masks.min_heads_per_layer``):

    * rule ``ema``: from the moving average of ``|dL/dgate|`` of the language's own training
      steps (the gates carry gradients in every step, so tracking costs no extra pass);
    * rule ``learned``: from per-language hard-concrete gate logits trained with the model and
      a penalty towards ``masks.keep_ratio``; the training forward pass always uses the sampled
      gates, and the mask is the deterministic one (a head is kept when its logit is positive).

    ``method.apply`` decides, as for static masks, whether the current mask gates the forward
    pass, restricts the update, or both. A coordinate that re-enters a language's subnetwork
    continues from the optimizer state it had when it left (:class:`MaskedOptimizer`: frozen,
    not advanced). The mask after every update and the number of heads that changed are kept
    per language and written, with figures, to ``<run>/masks/`` at the end of training.
    """

    name = "dynamic"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.dynamic = cfg.dynamic
        self.rule = setting(cfg.dynamic.rule)
        self.ema: ImportanceEMA | None = None
        self.learned: HardConcreteGates | None = None
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self.history: dict[str, list[dict[str, Any]]] = {}

    def attach(self, experiment: Experiment) -> None:
        shape = experiment.model.gates.shape
        self.ema = ImportanceEMA(shape, self.dynamic.decay)
        if self.rule == "learned":
            self.learned = HardConcreteGates(
                list(experiment.train_data), shape, beta=self.dynamic.temperature
            )
            self.learned.to(experiment.device)
            self.gate_optimizer = torch.optim.Adam(self.learned.parameters(), lr=self.dynamic.gate_lr)

    def setup(self, experiment: Experiment) -> None:
        self.model = experiment.model
        if self.masks is not None:  # restored from a checkpoint
            return
        if setting(self.dynamic.init) == "static":
            super().setup(experiment)
            if self.learned is not None:  # start the logits at the static masks
                with torch.no_grad():
                    for lang, subnetwork in self.masks.items():
                        self.learned.log_alpha[lang].copy_(subnetwork.head_mask.float() * 4 - 2)
        else:
            masks = SubnetworkSet.for_model(experiment.model)
            for lang in experiment.train_data:
                masks[lang] = Subnetwork(torch.ones(experiment.model.gates.shape, dtype=torch.bool))
            self.set_masks(masks)
        self._record(0, {lang: 0 for lang in self.masks})

    # ---------------------------------------------------------------- training
    def track_gates(self, lang: str) -> bool:
        return self.rule == "ema"

    def train_step(self, experiment: Experiment, lang: str, batch) -> StepResult:
        if self.rule == "ema":
            return super().train_step(experiment, lang, batch)
        target = experiment.cfg.masks.keep_ratio
        self.gate_optimizer.zero_grad(set_to_none=True)
        result = training_step(
            experiment.model,
            batch,
            experiment.optimizer,
            gates=self.learned.sample(lang),
            update_mask=self.update_mask(lang),
            clip_norm=experiment.cfg.train.clip_norm,
            scheduler=experiment.scheduler,
            extra_loss=lambda: self.dynamic.sparsity_weight * self.learned.sparsity_penalty(lang, target),
            parallel=experiment.parallel,
            also_average=list(self.learned.parameters()),
        )
        if result.skipped:
            self.gate_optimizer.zero_grad(set_to_none=True)
        else:
            self.gate_optimizer.step()
        return result

    def record_gate_grad(self, lang: str, gate_grad: torch.Tensor) -> None:
        """Fold one step's ``dL/dgate`` of ``lang`` into its moving average (rule ``ema``)."""
        if self.rule == "ema":
            self.ema.update(lang, gate_grad)

    def after_step(self, experiment: Experiment, result: StepResult) -> dict[str, float]:
        if result.gate_grad is not None:
            self.record_gate_grad(result.language, result.gate_grad)
        logs = {}
        if self.rule == "learned":
            logs["masks/open_probability"] = float(
                self.learned.open_probability(result.language).detach().mean()
            )
        if experiment.step % self.dynamic.update_every == 0:
            changed = self.update_masks(experiment.step)
            logs["masks/heads_changed"] = float(sum(changed.values()))
            logs.update({f"masks/{lang}/sparsity": self.masks[lang].sparsity() for lang in self.masks})
        return logs

    def update_masks(self, step: int) -> dict[str, int]:
        """Re-select every language's mask; returns the number of heads that changed per language."""
        settings = self.settings
        masks, changed = SubnetworkSet.for_model(self.model), {}
        for lang, current in self.masks.items():
            if self.rule == "learned":
                mask = self.learned.mask(lang, settings.min_heads_per_layer)
                scores = self.learned.open_probability(lang).detach()
            elif lang in self.ema.averages:
                scores = self.ema.scores(lang)
                mask = reselect(
                    scores, current.head_mask, setting(self.dynamic.selection), settings.keep_ratio,
                    settings.top_k, self.dynamic.score_threshold, settings.min_heads_per_layer,
                )  # fmt: skip
            else:  # no step of this language yet
                mask, scores = current.head_mask, current.scores
            masks[lang] = Subnetwork(mask, current.param_masks, scores)
            changed[lang] = int((mask != current.head_mask).sum())
        self.set_masks(masks)
        self._record(step, changed)
        return changed

    def _record(self, step: int, changed: dict[str, int]) -> None:
        for lang, subnetwork in self.masks.items():
            self.history.setdefault(lang, []).append({
                "step": step, "changed": changed.get(lang, 0), "sparsity": subnetwork.sparsity(),
                "mask": subnetwork.head_mask.int().tolist(),
            })  # fmt: skip

    # ---------------------------------------------------------------- outputs and state
    def on_train_end(self, experiment: Experiment) -> None:
        """Write the final masks, overlap heatmap, and the mask history with its figure."""
        self.write_summary(experiment)
        folder = experiment.run_dir / "masks"
        atomic_write_json(folder / "history.json", self.history)
        figure = history_figure(self.history)
        figure.savefig(folder / "history.png", dpi=120)
        experiment.log({}, images={"masks/history": figure})
        import matplotlib.pyplot as plt

        plt.close(figure)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["mask_changes"] = {
            lang: sum(h["changed"] for h in entries) for lang, entries in self.history.items()
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ema"] = self.ema.state_dict()
        state["history"] = self.history
        if self.learned is not None:
            state["learned"] = self.learned.state_dict()
            state["gate_optimizer"] = self.gate_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema.load_state_dict(state["ema"])
        self.history = {lang: [dict(h) for h in entries] for lang, entries in state["history"].items()}
        if self.learned is not None:
            self.learned.load_state_dict(state["learned"])
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])


def history_figure(history: dict[str, list[dict[str, Any]]]):
    """Sparsity and heads changed per mask update, one line per language."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    plot_history(history, top, bottom)
    top.legend(fontsize=8, ncol=2)
    top.set_title("Dynamic subnetworks")
    figure.tight_layout()
    return figure


def plot_history(history: dict[str, list[dict[str, Any]]], top, bottom) -> None:
    """Draw a mask history on two matplotlib axes: share of heads removed (``top``) and heads
    changed (``bottom``) at each update, one line per language."""
    for lang, entries in history.items():
        steps = [h["step"] for h in entries]
        top.plot(steps, [h["sparsity"] for h in entries], marker=".", label=lang)
        bottom.plot(steps, [h["changed"] for h in entries], marker=".", label=lang)
    top.set_ylabel("share of heads removed")
    bottom.set_ylabel("heads changed")
    bottom.set_xlabel("training step")
