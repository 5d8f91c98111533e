"""Subnetworks where Hugging Face users work: any ``PreTrainedModel``, the ``Trainer``, an
``accelerate`` loop, and subnetwork sets shared like adapters.

::

    from subnets.hf import SubnetworkConfig, SubnetworkTrainer, find_subnetworks, with_subnetworks

    model = with_subnetworks(AutoModelForTokenClassification.from_pretrained(name, num_labels=17),
                             SubnetworkConfig(units="heads", keep_ratio=0.5))
    find_subnetworks(model, {"de": german_train, "fr": french_train}, collate_fn=collator)
    SubnetworkTrainer(model, args, train_dataset=mixed, data_collator=collator).train()
    model.save_pretrained("my-subnetworks")       # masks, trained weights, config, card (push_to_hub=True to share)
"""

from subnets.hf.config import SubnetworkConfig
from subnets.hf.find import find_subnetworks
from subnets.hf.hub import Subnetworks
from subnets.hf.model import LANGUAGE_COLUMN, SubnetworkModel, masked_optimizer, with_subnetworks

__all__ = ["LANGUAGE_COLUMN", "SubnetworkConfig", "SubnetworkModel", "SubnetworkTrainer", "Subnetworks",
           "LanguageGroupedSampler", "find_subnetworks", "masked_optimizer", "with_subnetworks"]  # fmt: skip


def __getattr__(name: str):
    # the Trainer pieces import transformers.Trainer (and accelerate): only when asked for
    if name in ("SubnetworkTrainer", "LanguageGroupedSampler", "LanguageCollator"):
        from subnets.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'subnets.hf' has no attribute {name!r}")
