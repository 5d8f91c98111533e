"""Subnetwork sets to share: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

A :class:`Subnetworks` folder (or Hub repository) holds

* ``subnetworks.safetensors``: every language's unit mask (and parameter masks, scores), in the
  format of :meth:`subnets.masks.SubnetworkSet.save`;
* ``config.json``: the :class:`~subnets.hf.SubnetworkConfig`, the base model it was made for
  (name, revision, model type, unit geometry), the languages and their sparsity, and what made it;
* ``README.md``: a model card with YAML metadata (``base_model``, ``language``,
  ``library_name: subnets``, tags) and the sparsity of each language.

Loading is two lines::

    base = AutoModelForTokenClassification.from_pretrained("intfloat/multilingual-e5-small")
    model = SubnetworkModel.from_pretrained(base, "someone/e5-ud-subnetworks")   # or a folder

The Hub transfer is ``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from torch import nn

from subnets.files import read_json
from subnets.hf.config import SubnetworkConfig
from subnets.masks.subnetwork import SubnetworkSet

FORMAT = "subnets-subnetworks-1"
MASKS_FILE = "subnetworks.safetensors"
CONFIG_FILE = "config.json"

CARD = """---
{{ card_data }}
---

# Language subnetworks for {{ base_name }}

Masks over the {{ units_text }} of [{{ base_name }}]({{ base_link }}), one per language, made with
[subnets](https://github.com/subnets/subnets): each language runs (and is trained) through its own
subnetwork.

| language | units kept | sparsity |
|---|---|---|
{{ rows }}

Settings: `{{ settings }}`.

## Use

```python
from transformers import AutoModel  # or the AutoModelFor* class of your task
from subnets.hf import SubnetworkModel

model = SubnetworkModel.from_pretrained(AutoModel.from_pretrained("{{ base_name }}"), "<this repository or folder>")
with model.language("{{ first }}"):
    outputs = model(**inputs)
```

## How it was made

{{ made_by }}
"""


class Subnetworks(
    ModelHubMixin,
    library_name="subnets",
    tags=["subnetworks", "cross-lingual-transfer", "pruning"],
    repo_url="https://github.com/subnets/subnets",
):
    """A shareable set of language subnetworks: the masks, the :class:`SubnetworkConfig` that
    made them, and the base model they belong to.

    Args:
        masks: the subnetworks (language -> :class:`~subnets.masks.Subnetwork`).
        subnetwork_config: how they were found and what they restrict.
        base: the base model: ``name`` (hub name or path), ``revision`` (commit, if known),
            ``model_type``.
        provenance: the command or code that made them (goes into the model card).
    """

    def __init__(self, masks: SubnetworkSet, subnetwork_config: SubnetworkConfig | None = None,
                 base: dict | None = None, provenance: str | None = None):  # fmt: skip
        self.masks = masks
        self.subnetwork_config = subnetwork_config or SubnetworkConfig()
        self.base = dict(base or {})
        self.provenance = provenance

    # ---------------------------------------------------------------- the mixin's hooks
    def _save_pretrained(self, save_directory: Path) -> None:
        self.masks.save(save_directory / MASKS_FILE)
        config = {
            "format": FORMAT,
            "config": self.subnetwork_config.to_dict(),
            "base_model": self.base,
            "num_layers": self.masks.num_layers,
            "units": self.masks.units,
            "languages": list(self.masks),
            "sparsity": {code: s.sparsity() for code, s in self.masks.items()},
            "made_by": self.provenance,
        }
        (save_directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, **kwargs) -> Subnetworks:  # fmt: skip
        def fetch(name: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{model_id} is not a subnetwork set: it has no {name} "
                                            "(written by SubnetworkModel.save_pretrained)")  # fmt: skip
                return path
            return hf_hub_download(repo_id=model_id, filename=name, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only, token=token)  # fmt: skip

        config_path = fetch(CONFIG_FILE)
        config = read_json(config_path, "subnetwork set config")
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: not a subnetwork set config (format "
                             f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")  # fmt: skip
        masks = SubnetworkSet.load(fetch(MASKS_FILE))
        settings = SubnetworkConfig.from_dict(config.get("config") or {}, f"{config_path}: config")
        return cls(masks, settings, config.get("base_model"), config.get("made_by"))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        name = self.base.get("name") or "a transformer"
        data = ModelCardData(
            base_model=name if self.base.get("name") and not os.path.isabs(name) else None,
            language=list(self.masks) or None,
            library_name="subnets",
            tags=list(self._hub_mixin_info.model_card_data.tags or []),
        )
        rows = "\n".join(f"| {code} | {s.num_units_kept} of {s.unit_mask.numel()} | {s.sparsity():.3f} |"
                         for code, s in self.masks.items())  # fmt: skip
        made_by = f"```\n{self.provenance}\n```" if self.provenance else "Not recorded."
        return ModelCard.from_template(
            card_data=data, template_str=CARD, base_name=name, rows=rows or "| (none) | | |",
            base_link=f"https://huggingface.co/{name}" if data.base_model else name,
            units_text=" and ".join(self.masks.units), first=next(iter(self.masks), "de"),
            settings=json.dumps(self.subnetwork_config.to_dict()), made_by=made_by,
        )  # fmt: skip


def base_identity(model: nn.Module) -> dict[str, Any]:
    """Name, revision and type of a Hugging Face model (what a subnetwork set records of its base)."""
    config = getattr(model, "config", None)
    return {
        "name": getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
    }


__all__ = ["Subnetworks", "base_identity"]
