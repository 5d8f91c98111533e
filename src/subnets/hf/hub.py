"""Subnetwork sets to share: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

A [Subnetworks][subnets.hf.hub.Subnetworks] folder (or Hub repository) holds

* ``subnetworks.safetensors``: every language's unit mask (and parameter masks, scores), in the
  format of [subnets.masks.SubnetworkSet.save][subnets.masks.subnetwork.SubnetworkSet.save];
* ``weights.safetensors`` (only where training changed the model): every tensor of the model
  that differs from the base model's, in full (the task head included);
* ``config.json``: the [SubnetworkConfig][subnets.hf.SubnetworkConfig], the base model it was made for
  (name, revision, model type, unit geometry, and a sha256 of each of its tensors, so that
  loading refuses other weights), the languages and their sparsity, the sha256 of the files
  above, and what made it;
* ``README.md``: a model card with YAML metadata (``base_model``, ``language``,
  ``library_name: subnets``, tags) and the sparsity of each language.

Loading is two lines::

    base = AutoModelForTokenClassification.from_pretrained("intfloat/multilingual-e5-small")
    model = SubnetworkModel.from_pretrained(base, "someone/e5-ud-subnetworks")   # or a folder

The Hub transfer is ``huggingface_hub``'s ``ModelHubMixin``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from subnets.data.cache import sha256_path
from subnets.files import load_safetensors, read_json, save_safetensors
from subnets.hf.config import SubnetworkConfig
from subnets.masks.subnetwork import SubnetworkSet

FORMAT = "subnets-subnetworks-1"
MASKS_FILE = "subnetworks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"

CARD = """---
{{ card_data }}
---

# Language subnetworks for {{ base_title }}

Masks over the {{ units_text }} of {{ base_text }}, one per language, made with
[subnets](https://github.com/subnets/subnets): each language runs (and is trained) through its own
subnetwork. {{ weights_text }}

| language | units kept | sparsity |
|---|---|---|
{{ rows }}

Settings: `{{ settings }}`.

## Use

```python
from transformers import AutoModel  # or the AutoModelFor* class of your task
from subnets.hf import SubnetworkModel

base = {{ base_code }}
model = SubnetworkModel.from_pretrained(base, "<this repository or folder>")
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
    """A shareable set of language subnetworks: the masks, the
    [SubnetworkConfig][subnets.hf.hub.SubnetworkConfig] that made them, and the base model they belong to.

    Args:
        masks: the subnetworks (language -> [Subnetwork][subnets.masks.Subnetwork]).
        subnetwork_config: how they were found and what they restrict.
        base: the base model: ``name`` (hub name or path), ``revision`` (commit, if known),
            ``model_type``, ``fingerprint`` (tensor name -> sha256, [tensor_sha256][subnets.hf.hub.tensor_sha256]).
        provenance: the command or code that made them (goes into the model card).
        weights: the tensors training changed (name -> tensor, in full), or None (masks only).
    """

    def __init__(self, masks: SubnetworkSet, subnetwork_config: SubnetworkConfig | None = None,
                 base: dict | None = None, provenance: str | None = None,
                 weights: dict[str, torch.Tensor] | None = None):  # fmt: skip
        self.masks = masks
        self.subnetwork_config = subnetwork_config or SubnetworkConfig()
        self.base = dict(base or {})
        self.provenance = provenance
        self.weights = weights or None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token=None, cache_dir=None, local_files_only: bool = False,
                        revision: str | None = None) -> Subnetworks:  # fmt: skip
        """The set in a folder or a Hub repository (``revision``, ``token``, ... as ``hf_hub_download``
        takes them).

        Raises:
            FileNotFoundError: a folder that does not exist (and is no Hub repository name).
            ValueError: a damaged set: ``config.json`` not valid JSON or without its ``config``
                section, a file whose sha256 is not the one ``config.json`` records.
        """
        model_id = str(pretrained_model_name_or_path)
        if not os.path.isdir(model_id) and not _is_repo_id(model_id):
            raise FileNotFoundError(f"{model_id}: no such folder (a subnetwork set is a folder written by "
                                    "save_pretrained, or a Hub repository 'user/name')")  # fmt: skip
        return cls._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir, token=token,
                                    force_download=force_download, local_files_only=local_files_only)  # fmt: skip

    # ---------------------------------------------------------------- the mixin's hooks
    def _save_pretrained(self, save_directory: Path) -> None:
        self.masks.save(save_directory / MASKS_FILE)
        files, weights = [MASKS_FILE], None
        if self.weights:
            save_safetensors(save_directory / WEIGHTS_FILE, self.weights, {"base_model": self.base.get("name")})  # fmt: skip
            files.append(WEIGHTS_FILE)
            weights = {"file": WEIGHTS_FILE, "parameters": sum(t.numel() for t in self.weights.values()),
                       "tensors": list(self.weights)}  # fmt: skip
        else:
            (save_directory / WEIGHTS_FILE).unlink(missing_ok=True)  # an earlier save's
        config = {
            "format": FORMAT,
            "config": self.subnetwork_config.to_dict(),
            "base_model": self.base,
            "num_layers": self.masks.num_layers,
            "units": self.masks.units,
            "languages": list(self.masks),
            "sparsity": {code: s.sparsity() for code, s in self.masks.items()},
            "made_by": self.provenance,
            "weights": weights,
            "sha256": {name: sha256_path(save_directory / name) for name in files},
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

        def checked(name: str) -> str:
            path = fetch(name)
            expected = (config.get("sha256") or {}).get(name)  # sets saved before checksums have none
            found = sha256_path(path) if expected is not None else None
            if found != expected:
                raise ValueError(f"{path}: its sha256 ({found}) is not the one {config_path} records "
                                 f"({expected}): the file was changed or damaged after it was saved")  # fmt: skip
            return path

        config_path = fetch(CONFIG_FILE)
        config = read_json(config_path, "subnetwork set config")
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: not a subnetwork set config (format "
                             f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")  # fmt: skip
        if not isinstance(config.get("config"), dict):
            raise ValueError(f"{config_path}: no 'config' section (the SubnetworkConfig the subnetworks were made "
                             "with); the file is damaged or was not written by save_pretrained")  # fmt: skip
        masks = SubnetworkSet.load(checked(MASKS_FILE))
        weights = None
        if config.get("weights"):
            weights, _ = load_safetensors(checked(WEIGHTS_FILE), what="file of trained weights")
        settings = SubnetworkConfig.from_dict(config["config"], f"{config_path}: config")
        return cls(masks, settings, config.get("base_model"), config.get("made_by"), weights)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        name = self.base.get("name")
        on_hub = bool(name) and _is_repo_id(name) and not os.path.isdir(name)
        load = 'AutoModel.from_pretrained("{}")  # as the subnetworks were made: dtype, task head'
        if on_hub:
            title, text, code = name, f"[{name}](https://huggingface.co/{name})", load.format(name)
        elif name:
            title, text, code = name, f"`{name}` (a local folder)", load.format(name)
        else:
            title, text = "an unnamed base model", "the base model they were made for (its name was not recorded)"  # fmt: skip
            code = "...  # the model these subnetworks were made for, with the weights it had then"
        if self.weights:
            numel = sum(t.numel() for t in self.weights.values())
            weights_text = (f"With them, `{WEIGHTS_FILE}` holds what training changed: the {len(self.weights)} "
                            f"tensors ({numel:,} parameters) that differ from the base model's, which loading "
                            "puts onto the base model.")  # fmt: skip
        else:
            weights_text = "Masks only: the base model's weights are used as they are."
        data = ModelCardData(
            base_model=name if on_hub else None,
            language=list(self.masks) or None,
            library_name="subnets",
            tags=list(self._hub_mixin_info.model_card_data.tags or []),
        )
        rows = "\n".join(f"| {code} | {s.num_units_kept} of {s.unit_mask.numel()} | {s.sparsity():.3f} |"
                         for code, s in self.masks.items())  # fmt: skip
        made_by = f"```\n{self.provenance}\n```" if self.provenance else "Not recorded."
        return ModelCard.from_template(
            card_data=data, template_str=CARD, base_title=title, base_text=text, base_code=code,
            weights_text=weights_text, rows=rows or "| (none) | | |", units_text=" and ".join(self.masks.units), first=next(iter(self.masks), "de"),
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


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model.state_dict()``, each once (a tied weight under its first name)."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's dtype, shape and bytes (``meta`` for a tensor without data)."""
    if tensor.is_meta:
        return "meta"
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype} {tuple(tensor.shape)} ".encode())
    digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def changed_tensors(model: nn.Module, base_fingerprint: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` whose sha256 is not the one ``base_fingerprint`` records (name ->
    a copy on the CPU): what training changed."""
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model_tensors(model).items()
        if base_fingerprint.get(name) != tensor_sha256(tensor)
    }


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Each tensor's [tensor_sha256][subnets.hf.hub.tensor_sha256] (tensor name -> sha256)."""
    return {name: tensor_sha256(tensor) for name, tensor in model_tensors(model).items()}


def load_trained_weights(model: nn.Module, base_fingerprint: dict[str, str], shared: Subnetworks, source: str) -> None:  # fmt: skip
    """Check ``model``'s weights (their ``base_fingerprint``, taken when it was wrapped) against
    the base fingerprint of the set ``shared`` (read from ``source``), then put the set's changed
    tensors onto it. A changed tensor of the task head (outside ``base_model``) may
    start from other weights: it is replaced whole, and a head the checkpoint lacks is
    initialised at random on each load."""
    recorded, weights = shared.base.get("fingerprint") or {}, shared.weights or {}
    tensors = model_tensors(model)
    body = {id(t) for t in model.base_model.state_dict(keep_vars=True).values()}
    ours = shared.base.get("name") or "an unnamed model"
    missing = [name for name in dict.fromkeys([*recorded, *weights]) if name not in tensors]
    extra = [name for name in tensors if recorded and name not in recorded and name not in weights]
    if missing or extra:
        has, lacks = ("the trained model", "this model") if missing else ("this model", "the trained model")  # fmt: skip
        raise ValueError(f"{source}: {has} has a tensor {(missing or extra)[0]} that {lacks} lacks "
                         f"(trained from {ours})")  # fmt: skip
    for name, digest in recorded.items():
        replaced = name in weights and id(tensors[name]) not in body
        if base_fingerprint[name] != digest and not replaced:
            raise ValueError(f"{source}: this model's weights are not the weights these subnetworks were trained from: "
                             f"{name} differs (here {tensors[name].dtype} {tuple(tensors[name].shape)}; trained from "
                             f"{ours}); load the base model as it was then (the same "
                             "checkpoint and dtype; weights the checkpoint lacks are initialised at random, so "
                             "seed them as then)")  # fmt: skip
    for name, value in weights.items():
        if (value.shape, value.dtype) != (tensors[name].shape, tensors[name].dtype):
            raise ValueError(f"{source}: the trained {name} is {value.dtype} {tuple(value.shape)}, this "
                             f"model's {tensors[name].dtype} {tuple(tensors[name].shape)}")  # fmt: skip
    model.load_state_dict(weights, strict=False)  # (refreshes subnetwork values: subnets.masks.compact)


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


__all__ = [
    "Subnetworks",
    "base_identity",
    "changed_tensors",
    "fingerprint",
    "load_trained_weights",
    "model_tensors",
    "tensor_sha256",
]
