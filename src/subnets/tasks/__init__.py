"""Tasks ([Task][subnets.tasks.Task]): UD parsing, tagging, NER, classification and language modelling, each
a ``task=<name>`` config naming its class by ``_target_`` ([subnets.tasks.base][])."""

from subnets.tasks.base import LabelledTask, Task, build_task
from subnets.tasks.classification import Classification, TextExample
from subnets.tasks.lm import LanguageModelling, TextLine
from subnets.tasks.parsing import Parsing
from subnets.tasks.tagging import NER, TaggedSentence, Tagging

__all__ = ["NER", "Classification", "LabelledTask", "LanguageModelling", "Parsing", "TaggedSentence", "Tagging",
           "Task", "TextExample", "TextLine", "build_task"]  # fmt: skip
