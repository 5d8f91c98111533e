"""subnets: language-specific subnetworks for cross-lingual transfer.

The names a notebook needs, in one place::

    from subnets import compose_config, run                     # a whole run, as the CLI runs it
    from subnets import assemble, Parsing, NER, Classification  # a run's parts; the tasks
    from subnets import load_run, evaluate_run                  # a trained run, reused
    from subnets import HeadGates, unit_importance, select_keep_ratio, MaskedOptimizer, MAML
"""

from subnets.analysis import (
    cka_matrix,
    conflict_matrix,
    linear_cka,
    overlap_typology_correlation,
    typological_similarity,
)
from subnets.config import Config, compose_config, default_config
from subnets.data import Batch, Collator, LanguageSampler, Sentence, read_conllu, write_conllu
from subnets.data.dataset import Batcher, LanguageData, load_language
from subnets.evaluate import Evaluator, evaluate, predict
from subnets.evaluate.fewshot import few_shot, fine_tune
from subnets.masks import (
    Subnetwork,
    SubnetworkSet,
    find_subnetwork,
    fisher_information,
    fisher_per_unit,
    iterative_pruning,
    select_keep_ratio,
    select_parameters,
    select_top_k,
    unit_importance,
    unit_parameter_masks,
)
from subnets.masks.dynamic import HardConcreteGates, ImportanceEMA
from subnets.meta import MAML, MetaTask
from subnets.methods import (
    BatchStep,
    DynamicMasks,
    MAMLEpisodes,
    MaskPolicy,
    Method,
    NoMasks,
    RandomControl,
    StaticMasks,
    StepStrategy,
    SubnetworkPolicy,
)
from subnets.metrics import attachment_scores, score_conllu
from subnets.models.build import build_encoder, build_model
from subnets.models.encoder import Encoder, load_pretrained
from subnets.models.gates import HeadGates, NeuronGates, UnitGates
from subnets.models.heads import SequenceClassifier, TaskModel, TokenClassifier
from subnets.models.layouts import AttentionLayout, FeedForwardLayout, ModelLayout, detect_layout
from subnets.models.lm import LanguageModel
from subnets.models.parser import DependencyParser
from subnets.optim import MaskedOptimizer, UpdateMask
from subnets.runs.folder import RunFolder
from subnets.runs.trained import TrainedRun, evaluate_run, load_run
from subnets.tasks import NER, Classification, LanguageModelling, Parsing, Tagging, Task
from subnets.training.assemble import Parts, assemble, build_method, build_task
from subnets.training.runner import Run, run
from subnets.training.update import apply_update, training_step

__version__ = "0.1.0"

__all__ = [
    "NER", "Classification", "Evaluator", "LanguageModel", "LanguageModelling", "Parsing", "Parts", "RunFolder",
    "SequenceClassifier", "Tagging", "Task", "TaskModel", "TokenClassifier", "assemble", "build_method", "build_task",
    "MAML", "AttentionLayout", "Batch", "BatchStep", "Batcher", "Collator", "Config", "DependencyParser",
    "DynamicMasks", "Encoder", "FeedForwardLayout", "HardConcreteGates", "HeadGates", "ImportanceEMA", "LanguageData",
    "LanguageSampler", "MAMLEpisodes", "MaskPolicy", "MaskedOptimizer", "MetaTask", "Method", "ModelLayout",
    "NeuronGates", "NoMasks", "RandomControl", "Run", "Sentence", "StaticMasks", "StepStrategy", "Subnetwork",
    "SubnetworkPolicy", "SubnetworkSet", "TrainedRun", "UnitGates", "UpdateMask", "apply_update", "attachment_scores",
    "build_encoder", "build_model", "cka_matrix", "compose_config", "conflict_matrix", "default_config", "detect_layout",
    "evaluate", "evaluate_run", "few_shot", "find_subnetwork", "fine_tune", "fisher_information", "fisher_per_unit",
    "unit_importance", "unit_parameter_masks", "iterative_pruning", "linear_cka", "load_language",
    "load_pretrained", "load_run", "overlap_typology_correlation", "predict", "read_conllu", "run", "score_conllu",
    "select_keep_ratio", "select_parameters", "select_top_k", "training_step", "typological_similarity",
    "write_conllu",
]  # fmt: skip
