"""Building what a config describes, the one way that training, the start-up checks
(``overwrite=true``), [load_run][subnets.runs.trained.load_run] and ``python -m subnets.evaluate`` all use,
so that they cannot drift: the task, its data, the encoder and its tokenizer, the task model,
the collator, the method.

Example (a notebook)::

    cfg = compose_config(["task=ner", "+method=dynamic", "debug=tiny"])
    parts = assemble(cfg, "outputs/try")     # parts.data, parts.model, parts.batcher, parts.method
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from subnets.config import SettingError, setting, validate_config
from subnets.data.dataset import Batcher
from subnets.data.languages import RunData, data_cache, data_root, load_run_data
from subnets.data.sampling import LanguageSampler
from subnets.methods.base import Method, TrainingBatches
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import max_subwords
from subnets.parallel.distributed import DataParallel
from subnets.runs.identity import model_fingerprint
from subnets.tasks.base import Task, build_task
from subnets.training.update import linear_schedule, parameter_groups

log = logging.getLogger(__name__)


def build_method(cfg: DictConfig) -> Method:
    """The method of ``cfg.method``: its mask policy and step strategy built from their ``_target_``."""
    return Method(str(cfg.method.name), instantiate(cfg.method.policy), instantiate(cfg.method.step))


def resolve_device(name: str, parallel: DataParallel | None = None) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else the CPU; under ``torchrun``,
    ``cuda`` is each process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(f"train.device={name}: this machine has no CUDA device (torch "
                           f"{torch.__version__}); use train.device=auto or cpu")  # fmt: skip
    if name == "cuda" and parallel is not None and parallel.world_size > 1:
        name = f"cuda:{parallel.local_rank}"
    return torch.device(name)


def check_method_settings(cfg: DictConfig, method: Method) -> None:
    """Refuse ``masks.path`` for a method whose policy would not read it, ``masks.after_steps``
    for one that searches its masks before training only (dynamic.init=static), an
    ``after_steps`` that contradicts ``masks.path`` or leaves no masked training,
    ``train.compile`` with second-order MAML, ``train.precision=bf16_base`` without subnetwork-only
    training, and ``masks.importance=activation`` where it does not
    apply ([check_activation_importance][subnets.training.assemble.check_activation_importance])."""
    policy = method.policy
    name = f"method {cfg.method.name} ({type(policy).__name__})"
    if setting(cfg.train.parallel) == "fsdp":
        check_sharding_settings(cfg, method)
    if cfg.train.compile and method.strategy.functional and not cfg.meta.first_order:
        raise SettingError("train.compile=true with meta.first_order=false: a compiled encoder has no double "
                           "backward through MAML's inner steps; use first-order MAML or train.compile=false")  # fmt: skip
    if cfg.masks.path and not getattr(policy, "uses_masks_path", False):
        raise SettingError(
            f"masks.path={cfg.masks.path!r} is not used by {name}; only static masks (+method=static, "
            "maml_static, random, maml_random) and dynamic ones starting from them (dynamic.init=static) "
            "read a saved mask set"
        )
    if setting(cfg.masks.train) == "subnetwork":
        check_subnetwork_only(cfg, method)
    if setting(cfg.train.precision) == "bf16_base" and (
        setting(cfg.masks.train) != "subnetwork" or not policy.has_subnetworks
    ):
        raise SettingError(f"train.precision=bf16_base with +method={cfg.method.name} and masks.train="
                           f"{setting(cfg.masks.train)}: the transformer's weights are stored in bfloat16 and frozen, "
                           "and only training the subnetworks alone keeps fp32 master copies of what it trains; use "
                           "masks.train=subnetwork with +method=static, dynamic or random, or train.precision=bf16 "
                           "(autocast over fp32 weights)")  # fmt: skip
    if setting(cfg.masks.importance) == "activation":
        check_activation_importance(cfg, method)
    dynamic = getattr(policy, "dynamic", None)
    if dynamic is not None and dynamic.update_every >= cfg.train.steps:
        log.warning("dynamic.update_every=%d with train.steps=%d: the masks are never updated, so this %s run "
                    "keeps its initial masks (dynamic.init=%s) throughout; lower dynamic.update_every",
                    dynamic.update_every, cfg.train.steps, cfg.method.name, setting(dynamic.init))  # fmt: skip
    after = cfg.masks.after_steps
    if not after:
        return
    if getattr(policy, "uses_masks_path", False) and not getattr(policy, "uses_after_steps", False):
        raise SettingError(f"masks.after_steps={after} is not supported by {name}: it searches its masks "
                           "before training; only static and random masks (+method=static, maml_static, random, "
                           "maml_random) are searched during training")  # fmt: skip
    if not getattr(policy, "uses_after_steps", False):
        return  # no mask search (like the other masks.* search settings, unused)
    if cfg.masks.path:
        raise SettingError(f"masks.after_steps={after} and masks.path={cfg.masks.path!r}: a loaded mask set "
                           "is used from the first step; set one of them")  # fmt: skip
    if after >= cfg.train.steps:
        raise SettingError(f"masks.after_steps={after}: expected fewer than train.steps={cfg.train.steps}, "
                           "or no step would be trained with the masks")  # fmt: skip


def check_subnetwork_only(cfg: DictConfig, method: Method) -> None:
    """Refuse ``masks.train=subnetwork`` ([subnets.masks.compact][]) where it cannot run, with why."""
    name = f"masks.train=subnetwork with +method={cfg.method.name}"
    if getattr(method.policy, "matches_static_budget", False):
        return  # lora / shira / sft.match=static: sized to a subnetwork-only budget (subnetwork_budget)
    if not method.policy.has_subnetworks:
        raise SettingError(f"{name}: the method has no language subnetworks to train alone; use a static, dynamic or "
                           "random method (+method=static, dynamic, random), or size a comparison method to the "
                           "subnetwork-only budget (lora.match, shira.match or sft.match=static)")  # fmt: skip
    if method.strategy.functional:
        raise SettingError(f"{name}: MAML's inner steps run on functional copies of whole parameters (torch.func), "
                           "not on the subnetworks' values; use +method=static, dynamic or random")  # fmt: skip
    if cfg.masks.after_steps > 0:
        raise SettingError(f"{name} and masks.after_steps={cfg.masks.after_steps}: until the masks exist every "
                           "parameter would train, as in full fine-tuning; find them before training "
                           "(masks.after_steps=0, on the pretrained model)")  # fmt: skip
    if setting(cfg.method.apply) == "forward":
        raise SettingError(f"{name} and method.apply=forward: forward gating alone updates every parameter; use "
                           "method.apply=gradient or both")  # fmt: skip
    if setting(cfg.train.parallel) == "fsdp":
        raise SettingError(f"{name} and train.parallel=fsdp: the subnetworks' values index rows of whole weights, "
                           "which FSDP2 shards; use train.parallel=ddp (the frozen base is small enough to hold "
                           "whole on each process when only the subnetworks train)")  # fmt: skip


def check_activation_importance(cfg: DictConfig, method: Method) -> None:
    """Refuse ``masks.importance=activation`` ([subnets.masks.activation][]) where it does not apply,
    with why: on attention heads, and with ``masks.target_policy=nearest`` for masks it scores."""
    units = setting(cfg.masks.units)
    if units != "neurons":
        raise SettingError(f"masks.importance=activation with masks.units={units}: activation probabilities (the share "
                           "of tokens on which a unit's activation is positive) score feed-forward neurons only; an "
                           "attention head has no such activation. Use masks.units=neurons, or masks.importance=head "
                           "or fisher for heads")  # fmt: skip
    policy = method.policy
    scored = getattr(policy, "uses_masks_path", False) and getattr(policy, "control", None) is None
    if scored and setting(cfg.masks.target_policy) == "nearest":
        raise SettingError("masks.target_policy=nearest with masks.importance=activation: nearest compares an unseen "
                           "language's gate-gradient importance with the source masks' scores, which are then "
                           "language-specificity scores (an entropy over the source languages) it cannot be compared "
                           "with; use masks.target_policy=support or full")  # fmt: skip


@dataclass
class CheckedSettings:
    """What [check_settings][subnets.training.assemble.check_settings] built to check the settings: the method
    and the task (not yet fitted to any data), which [assemble][subnets.training.assemble.assemble] then uses."""

    method: Method
    task: Task


def check_settings(cfg: DictConfig) -> CheckedSettings:
    """The settings alone (``validate_config``), those of the method
    ([check_method_settings][subnets.training.assemble.check_method_settings]) and of the task (its constructor): what
    is refused before any file is read or written. Returns the method and the task it built."""
    validate_config(cfg)
    method = build_method(cfg)
    check_method_settings(cfg, method)
    return CheckedSettings(method, build_task(cfg))


def check_sharding_settings(cfg: DictConfig, method: Method) -> None:
    """Refuse what ``train.parallel=fsdp`` does not run ([subnets.parallel.sharding][]), with why."""
    name = f"+method={cfg.method.name}"
    if method.strategy.functional:
        raise SettingError(f"train.parallel=fsdp: {name} meta-learns (MAML), whose inner steps run on functional "
                           "copies of whole parameters (torch.func), which FSDP2's sharded parameters are not; "
                           "first- and second-order MAML run with train.parallel=ddp")  # fmt: skip
    if not method.policy.supports_sharding:
        raise SettingError(f"train.parallel=fsdp: {name} ({type(method.policy).__name__}) copies or wraps the "
                           "model, which FSDP2 does not allow once it is sharded; the baseline, static, dynamic "
                           "and random methods run sharded, the others with train.parallel=ddp")  # fmt: skip
    refused = {
        "train.compile=true": cfg.train.compile,
        "train.keep_optimizer_state=false": not cfg.train.keep_optimizer_state,
        f"masks.after_steps={cfg.masks.after_steps}": bool(cfg.masks.after_steps),
        f"analysis.conflict_every={cfg.analysis.conflict_every}": cfg.analysis.conflict_every > 0,
        f"analysis.cka_sentences={cfg.analysis.cka_sentences}": cfg.analysis.cka_sentences > 0,
    }
    for what, is_set in refused.items():
        if is_set:
            raise SettingError(f"train.parallel=fsdp does not support {what} (a whole-model copy, search or "
                               "analysis on one process, or the sharded checkpoint rewritten); unset it or use "
                               "train.parallel=ddp")  # fmt: skip


@dataclass
class Parts:
    """What [assemble][subnets.training.assemble.assemble] builds. ``fingerprint``: the encoder's and tokenizer's as
    loaded (before any training; ``model_fingerprint``)."""

    cfg: DictConfig
    task: Task
    method: Method
    data: RunData | None
    tokenizer: Any
    model: nn.Module
    batcher: Batcher
    fingerprint: dict[str, str]

    @property
    def collator(self) -> Callable:
        return self.batcher.collator


def assemble(
    cfg: DictConfig,
    folder: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    task_state: Mapping[str, Any] | None = None,
    read_data: bool = True,
    read_train: bool = True,
    accept: Callable[[RunData | None, dict[str, str]], None] | None = None,
    checked: CheckedSettings | None = None,
) -> Parts:
    """Build the run ``cfg`` describes in ``folder``: the method, the task, the data (synthetic
    languages are written into ``folder/data``; the tiny model's tokenizer is trained on the
    training text and kept in ``folder/tokenizer``, or loaded from there), the encoder, the task
    model on ``device``, the collator and batcher.

    Args:
        task_state: the task's state as a trained run recorded it (its label set); None: learned
            from the training data ([fit][subnets.tasks.base.Task.fit]).
        read_data: read the languages' data (False: a trained model alone).
        read_train: read the training splits (an evaluation does not).
        accept: called with the data and the model's fingerprint once both are read, before
            anything else happens (a run folder checks that they are the ones it holds).
        checked: the settings as [check_settings][subnets.training.assemble.check_settings] checked them (its method
            and task are used); None: checked here.

    Every example read is checked against the task ([check][subnets.tasks.base.Task.check]: a label
    the training data never had is an error naming its file and line); a task that does not
    fit the model is refused ([use_model][subnets.tasks.base.Task.use_model]).
    """
    folder = Path(folder)
    checked = checked or check_settings(cfg)
    method, task = checked.method, checked.task
    if task_state is not None:
        task.load_state_dict(task_state)
    cache = data_cache(cfg.languages)
    data = None
    if read_data:
        data = load_run_data(cfg.languages, cfg.fewshot, data_root(cfg.languages, folder), task, seed=cfg.seed,
                             needs_support=method.policy.needs_support, read_train=read_train, cache=cache)  # fmt: skip
        if task_state is None:
            task.fit({code: d.examples for code, d in data.train.items()})
        for d in data.all():
            task.check(d.examples, f"{d.code} {d.split} ({d.path})")
    texts = None if data is None else (" ".join(e.forms) for d in data.train.values() for e in d.examples)
    transformer, tokenizer = build_encoder(cfg.model, cfg.seed, texts, folder / "tokenizer")
    fingerprint = model_fingerprint(transformer, tokenizer)
    if accept is not None:
        accept(data, fingerprint)
    if data is not None:
        data.tokenize(tokenizer, cache)
    model = build_model(
        cfg.model,
        transformer,
        task,
        tokenizer,
        precision=setting(cfg.train.precision),
        units=setting(cfg.masks.units),
    ).to(device)
    if cfg.model.gradient_checkpointing:
        if not getattr(transformer, "supports_gradient_checkpointing", False):
            raise SettingError(f"model.gradient_checkpointing=true: {type(transformer).__name__} has no activation "
                               "checkpointing of its own (Hugging Face supports_gradient_checkpointing)")  # fmt: skip
        kwargs = {"use_reentrant": False}  # transformers 5 renamed it (the old name is deprecated there)
        if hasattr(transformer, "activation_checkpointing_enable"):
            transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    batcher = Batcher(task.collator(tokenizer, _max_subwords(cfg, transformer, tokenizer), model.gates.layout.causal),
                      device, cfg.seed)  # fmt: skip
    return Parts(cfg, task, method, data, tokenizer, model, batcher, fingerprint)


@dataclass
class Training:
    """What training adds to [Parts][subnets.training.assemble.Parts]: the optimizer (wrapped by the method's policy),
    the learning-rate schedule, the language sampler and the batches it draws."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: LanguageSampler
    batches: TrainingBatches


def make_optimizer(train: Any, model: nn.Module, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``model``'s parameter groups (encoder and head rates, no decay on
    biases and LayerNorm) and ``extra_groups``."""
    groups = parameter_groups(model, train.lr_encoder, train.lr_head, train.weight_decay)
    return instantiate(train.optimizer)([*groups, *extra_groups])


def training(parts: Parts, parallel: DataParallel) -> Training:
    """Bind the method to the model and build what training needs (``train.*`` settings)."""
    cfg, policy, strategy, model = parts.cfg, parts.method.policy, parts.method.strategy, parts.model
    policy.bind(model, parts.batcher, list(parts.data.train))
    strategy.bind(model)
    groups = [*strategy.parameter_groups(), *policy.parameter_groups()]
    optimizer = policy.wrap_optimizer(make_optimizer(cfg.train, model, groups), model)
    decay = setting(cfg.train.schedule) == "linear"
    scheduler = linear_schedule(
        optimizer, cfg.train.warmup_steps, cfg.train.steps, decay, policy.schedule_restart
    )
    sizes = {code: len(data) for code, data in parts.data.train.items()}
    small = [f"{code} ({n})" for code, n in sizes.items() if n < parallel.world_size]
    if small:
        raise ValueError(f"{parallel.world_size} processes need at least as many training examples per language; "
                         f"too few in {', '.join(small)}")  # fmt: skip
    sampler = LanguageSampler(sizes, cfg.train.batch_size, cfg.train.sampling_alpha, cfg.seed)
    mixed = setting(cfg.train.batches) == "mixed"
    if mixed and not strategy.supports_mixed_batches:
        raise SettingError(f"train.batches=mixed: MAML episodes draw a batch per language; use train.batches=grouped "
                           f"with +method={cfg.method.name}")  # fmt: skip
    if mixed and not policy.supports_mixed_batches:
        raise SettingError(f"train.batches=mixed: +method={cfg.method.name} ({type(policy).__name__}) runs one "
                           "language per step; use train.batches=grouped")  # fmt: skip
    batches = TrainingBatches(sampler, parts.data.train, parts.batcher, parallel, mixed)
    return Training(optimizer, scheduler, sampler, batches)


def _max_subwords(cfg: DictConfig, transformer: nn.Module, tokenizer) -> int:
    limit = max_subwords(transformer, tokenizer)
    configured = cfg.model.max_subwords
    if configured and configured > limit:
        raise SettingError(f"model.max_subwords={configured} exceeds the encoder's limit {limit}")
    return configured or limit


def check_inputs(cfg: DictConfig, checked: CheckedSettings | None = None) -> None:
    """Everything a run checks before training that needs no run folder: the settings (unless
    ``checked`` holds what [check_settings][subnets.training.assemble.check_settings] returned for them), the
    method, the task, the data (synthetic languages written into a temporary folder) and the model
    ([assemble][subnets.training.assemble.assemble] there). ``overwrite=true`` calls it before it deletes
    anything."""
    with tempfile.TemporaryDirectory() as folder:
        assemble(cfg, folder, checked=checked)
