"""The settings schema: the dataclasses registered in Hydra's ConfigStore and filled in by the
YAML files under ``subnets/configs``; a misspelt key, a wrong type or a value outside an
enumeration fails when the config is composed, with the full key in the message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from subnets.config.baselines import AdapterPolicy, LoraSettings, SftSettings, ShiraMask, ShiraSettings  # noqa: F401 (part of the schema)
from subnets.config.choices import (  # noqa: F401 (the enumerations are part of the schema)
    ApplyMode,
    Batches,
    DataSource,
    DynamicInit,
    DynamicRule,
    DynamicSelection,
    FewShotOptimizer,
    Importance,
    OnError,
    Parallel,
    ParamMasks,
    ParamScope,
    Precision,
    Schedule,
    Selection,
    TargetPolicy,
    TrainedParameters,
    UnitKind,
    WandbMode,
)


@dataclass
class TinyModelConfig:
    """Settings of the built-in random BERT (``model.name_or_path=tiny``)."""

    architecture: str = "bert"  # bert | xlm-roberta | modernbert | mt5 (encoder) | qwen2 (causal decoder)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    num_kv_heads: int | None = None  # qwen2: key-value heads (grouped-query attention); None: half the heads
    vocab_size: int = 2000  # byte-pair vocabulary trained on the training text
    max_length: int = 128  # positions, special tokens included


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # 'tiny', a hub name or a local folder
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    attn_implementation: str | None = None  # eager | sdpa | None (the model's default)
    max_subwords: int | None = None  # window length in subwords; None: the model's limit
    mix_dropout: float = 0.0  # UDify layer dropout of the scalar mix
    encoder_dropout: float | None = None  # every dropout inside the encoder; None: the model's own
    # the encoder's word (input) embeddings are not updated (training, MAML, mask search, few-shot)
    freeze_embeddings: bool = False
    # where the transformer keeps its heads and neurons; None: detected (subnets.models.layouts,
    # docs/guides/models.md); declare it for a model no known layout fits, as a mapping
    # {attention: {...}, feed_forward: {...}, causal} (checked by ModelLayout.from_dict when
    # the model is built, at start; untyped here so that a command-line override can set it)
    layout: Any = None
    gradient_checkpointing: bool = False  # the transformer's own activation checkpointing (non-reentrant)


# The task group (``task=<name>``): each option's YAML file starts from one of these schemas
# (registered as ``task_schema/<name>``), so a misspelt task setting fails at start. A task of
# your own needs no schema: its config names the class by ``_target_`` and its arguments.
@dataclass
class ParsingTaskConfig:
    """``task=parsing``, ``parsing_pos``: [subnets.tasks.Parsing][]."""

    _target_: str = "subnets.tasks.Parsing"
    parse: bool = True  # dependency arcs and labels
    tag: bool = False  # UPOS tags
    arc_dim: int = 256
    label_dim: int = 128
    dropout: float = 0.33
    word_dropout: float = 0.1


@dataclass
class TaggingTaskConfig:
    """``task=tagging``, ``pos``: [subnets.tasks.Tagging][] (a CoNLL-U column)."""

    _target_: str = "subnets.tasks.Tagging"
    column: str = "upos"  # upos | xpos | feats | deprel
    dropout: float = 0.1


@dataclass
class NERTaskConfig:
    """``task=ner``: [subnets.tasks.NER][] (IOB2 tags in CoNLL columns)."""

    _target_: str = "subnets.tasks.NER"
    dropout: float = 0.1


@dataclass
class ClassificationTaskConfig:
    """``task=classification``: [subnets.tasks.Classification][] (sentences or pairs)."""

    _target_: str = "subnets.tasks.Classification"
    dropout: float = 0.1


@dataclass
class LanguageModellingTaskConfig:
    """``task=mlm``, ``clm``: [subnets.tasks.LanguageModelling][] on raw text."""

    _target_: str = "subnets.tasks.LanguageModelling"
    objective: str = "masked"  # masked (encoders) | causal (decoders)
    mlm_probability: float = 0.15


TASK_SCHEMAS = {"parsing": ParsingTaskConfig, "tagging": TaggingTaskConfig, "ner": NERTaskConfig,
                "classification": ClassificationTaskConfig, "lm": LanguageModellingTaskConfig}  # fmt: skip


@dataclass
class SyntheticLanguageConfig:
    order: str = "SVO"
    adjective: str = "before"
    adposition: str = "pre"
    parent: str | None = None
    overlap: float = 0.0


@dataclass
class SyntheticConfig:
    seed: int = 0
    train: int = 600
    dev: int = 100
    test: int = 200
    languages: dict[str, SyntheticLanguageConfig] = field(default_factory=dict)


@dataclass
class LanguagesConfig:
    source: DataSource = DataSource.synthetic
    ud_root: str | None = None  # UD folder (source=ud); default: $SUBNETS_UD_ROOT
    train: list[str] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    on_error: OnError = OnError["raise"]
    max_train_sentences: int | None = None  # per language
    max_eval_sentences: int | None = None  # per language and split (the first N)
    # Parsed and tokenized files kept as datasets on disk, shared by the jobs of a sweep
    # (subnets.data.cache); cache_dir: None is $SUBNETS_CACHE_DIR, else ~/.cache/subnets.
    cache: bool = True
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    steps: int = 400
    # The optimizer, called with the parameter groups (encoder and head rates, no decay on
    # biases and LayerNorm) and wrapped by the masked optimizer where a method masks updates.
    optimizer: Any = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True})
    batch_size: int = 32
    eval_batch_size: int = 128
    lr_encoder: float = 1e-3
    lr_head: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 40
    schedule: Schedule = Schedule.linear
    clip_norm: float = 5.0
    sampling_alpha: float = 0.5  # language sampling temperature: p(l) ~ size^alpha
    batches: Batches = Batches.grouped  # grouped: one language per batch; mixed: languages mixed in a batch
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each process's own GPU)
    max_nonfinite_steps: int = 10  # NaN/inf losses are skipped; this many in a row stop the run
    # A log interval whose mean loss exceeds divergence_factor x the best interval mean so far
    # is flagged (a warning; counted in results.json; checkpoints are not replaced while it
    # lasts); divergence_patience such intervals in a row stop the run. 0 switches it off.
    divergence_factor: float = 10.0
    divergence_patience: int = 3
    # false: a finished run's last checkpoint is rewritten without the optimizer state (AdamW's
    # two moments per parameter); evaluation still works, continuing its training does not
    keep_optimizer_state: bool = True
    # bf16: the encoder under autocast; bf16_base: also its weights stored in bf16 (frozen, masks.train=
    # subnetwork: fp32 master values); fp64: all in float64
    precision: Precision = Precision.fp32
    compile: bool = False  # torch.compile of the encoder (in place: checkpoint names unchanged)
    parallel: Parallel = Parallel.ddp  # under torchrun: whole replicas (ddp) or FSDP2 shards (fsdp)


@dataclass
class WandbConfig:
    mode: WandbMode | None = None  # None: $WANDB_MODE, else offline (subnets.training.tracking.wandb_mode)
    verbose: bool = False  # W&B's own console output (its run summary); off keeps the results table last
    project: str = "subnets"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class MethodConfig:
    """A method is a mask policy and a step strategy (``subnets.methods``), each built from
    its ``_target_`` with the other keys as arguments."""

    name: str = "baseline"  # the name in results.json and reports
    report_order: int = 0  # where reports put the method (lower first)
    control_of: str | None = None  # the method whose random-mask control this is (reports pair them)
    apply: ApplyMode = ApplyMode.gradient  # how a language's subnetwork is used (subnetwork methods)
    policy: Any = field(default_factory=lambda: {"_target_": "subnets.methods.NoMasks"})
    step: Any = field(default_factory=lambda: {"_target_": "subnets.methods.BatchStep"})


@dataclass
class MasksConfig:
    """How subnetworks are found (static and dynamic methods) and used for unseen languages."""

    path: str | None = None  # reuse a saved mask set (masks.safetensors) instead of computing one
    importance: Importance = Importance.head
    importance_batches: int = 8  # batches of `batch_size` sentences per language
    # importance=activation: a neuron can join language l's subnetwork first where l's activation
    # probability exceeds this quantile of all of them (every language and neuron; LAPE's 0.95)
    activation_quantile: float = 0.95
    batch_size: int = 16
    finetune_steps: int = 100  # brief fine-tuning of a copy on the language before scoring (0: none)
    # static and random masks: searched after this many steps of training the whole model (0: before)
    after_steps: int = 0
    selection: Selection = Selection.iterative
    keep_ratio: float = 0.5  # selection=keep_ratio
    top_k: int | None = None  # selection=top_k
    prune_fraction: float = 0.1  # selection=iterative: share of the remaining heads removed per round
    threshold: float = 0.9  # selection=iterative: stop below this share of the unpruned dev metric
    min_heads_per_layer: int = 1
    params: ParamMasks = ParamMasks.none  # unstructured parameter masks from Fisher information
    param_keep_ratio: float = 0.5
    param_scope: ParamScope = ParamScope["tensor"]
    param_include: list[str] = field(default_factory=lambda: [r"\.intermediate\.dense\.weight$"])  # regexes
    param_samples: int = 32  # single-sentence samples for the Fisher information
    target_policy: TargetPolicy = TargetPolicy.full  # unseen (dev and target) languages
    # heads, feed-forward neurons, or both (each kind selected on its own, keep_ratio of each)
    units: UnitKind = UnitKind.heads
    train: TrainedParameters = TrainedParameters.all  # subnetwork: the shared rest frozen


@dataclass
class DynamicConfig:
    """Dynamic subnetworks (``+method=dynamic``): masks updated jointly with the model."""

    rule: DynamicRule = DynamicRule.ema
    update_every: int = 50  # re-select every language's mask every N training steps
    decay: float = 0.9  # ema: weight of the old average at each of the language's steps
    init: DynamicInit = DynamicInit.full  # initial masks: all heads, or the static procedure's
    selection: DynamicSelection = DynamicSelection.keep_ratio  # uses masks.keep_ratio / top_k
    score_threshold: float = 0.3  # selection=threshold: keep heads whose normalised score reaches it
    gate_lr: float = 0.05  # learned: Adam learning rate of the gate logits
    sparsity_weight: float = 1.0  # learned: weight of (expected kept share - masks.keep_ratio)^2
    temperature: float = 0.6667  # learned: hard-concrete temperature (beta)


@dataclass
class MetaConfig:
    """MAML over languages (``+method=maml``, ``maml_static``, ``maml_dynamic``)."""

    first_order: bool = True
    inner_steps: int = 1
    inner_lr_encoder: float = 0.001  # inner SGD learning rate of the encoder
    inner_lr_head: float = 0.01  # inner SGD learning rate of the task head
    learn_inner_lr: bool = False  # Meta-SGD: train the two inner rates in the outer step
    inner_lr_lr: float = 1e-3  # outer learning rate of the (log) inner rates
    # Global norm the support gradient of each inner step is clipped to (0: no clipping). An
    # unclipped inner step grows with the support loss, and the first-order meta-gradient, taken
    # at the adapted weights, then no longer descends at the initial ones: maml_static diverged.
    inner_clip_norm: float = "${train.clip_norm}"  # type: ignore[assignment]
    languages_per_episode: int = 2
    support_size: int = 16  # sentences per language for the inner steps
    query_size: int = 16  # sentences per language for the query loss


@dataclass
class FewShotConfig:
    """The few-shot protocol on target languages, shared by every method."""

    k: int = 20  # support sentences: from train, else dev, else test (then excluded from the test set)
    repetitions: int = 5  # R draws of the support set, each with its own seed
    steps: int = 20  # fine-tuning steps on the k sentences (each an update on all k)
    # a larger support set (k x longest sentence, in subwords) runs in accumulated micro-batches
    max_tokens: int = 2048
    optimizer: FewShotOptimizer = FewShotOptimizer.adamw  # a fresh one per repetition, masked updates exact
    lr_encoder: float = "${train.lr_encoder}"  # type: ignore[assignment]
    lr_head: float = "${train.lr_head}"  # type: ignore[assignment]
    weight_decay: float = "${train.weight_decay}"  # type: ignore[assignment]


@dataclass
class AnalysisConfig:
    """Measurements taken during a run for [subnets.analysis][] (0 switches each off)."""

    conflict_every: int = 0  # cosines between the languages' gradients every N steps (and at step 0)
    conflict_batch_size: int = 8  # sentences per language for each measurement
    cka_sentences: int = 0  # parallel development sentences per language for CKA, before and after training


@dataclass
class Config:
    name: str = "default"  # experiment name: outputs/<name>/...
    budget: str = "none"  # the budget config that set steps and sizes (+experiment=ud_fewshot: cpu | paper)
    seed: int = 1
    resume: bool = True  # continue from the run folder's last checkpoint if there is one
    overwrite: bool = False  # delete the run folder's earlier outputs and start again
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = None  # the task group's option (task=<name>), with its own schema (TASK_SCHEMAS)
    languages: LanguagesConfig = field(default_factory=LanguagesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    shira: ShiraSettings = field(default_factory=ShiraSettings)
    sft: SftSettings = field(default_factory=SftSettings)
    meta: MetaConfig = field(default_factory=MetaConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
