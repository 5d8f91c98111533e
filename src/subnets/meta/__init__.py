"""Meta-learning: MAML over tasks (languages) with torch.func."""

from subnets.meta.maml import MAML, MetaStepResult, MetaTask, attention_implementations

__all__ = ["MAML", "MetaStepResult", "MetaTask", "attention_implementations"]
