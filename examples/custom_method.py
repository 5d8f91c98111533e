"""A method of your own, outside the package: random head masks as a control, drawn once.

The policy below is the whole method; ``configs/method/random_heads.yaml`` beside it names it by
``_target_``. From this folder::

    python -m subnets.train --config-dir configs +method=random_heads

``--config-dir`` adds the folder to Hydra's search path (so does ``hydra.searchpath=[file://configs]``);
``python -m`` puts the working folder on the import path, so this module is found. The method runs
with MAML too: add ``step: {_target_: subnets.methods.MAMLEpisodes, meta: ${meta}}`` to its config.
"""

import torch

from subnets import Subnetwork, SubnetworkPolicy, SubnetworkSet


class RandomHeads(SubnetworkPolicy):
    """Per-language random head masks with ``per_layer`` heads in every layer, drawn once."""

    def __init__(self, search, per_layer: int = 2, seed: int = 0, apply: str = "gradient"):
        super().__init__(search, apply)
        self.per_layer, self.seed = per_layer, seed

    def prepare(self, model, sources, outputs):
        if self.masks is None:  # else restored from a checkpoint
            generator = torch.Generator().manual_seed(self.seed)
            masks = SubnetworkSet.for_model(model)
            for lang in sources.train:
                ranks = torch.rand(model.gates.shape, generator=generator).argsort(dim=1).argsort(dim=1)
                masks[lang] = Subnetwork(ranks < self.per_layer)
            self.set_masks(masks)
            self.write_summary(outputs)  # masks/masks.safetensors, summary.json, overlap.png
