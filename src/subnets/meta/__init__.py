"""Meta-learning over languages: MAML with torch.func.functional_call."""

from subnets.meta.maml import MAML, MetaStepResult, Task, attention_implementations

__all__ = ["MAML", "MetaStepResult", "Task", "attention_implementations"]
