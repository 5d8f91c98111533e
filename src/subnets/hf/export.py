"""A trained run of subnets' runner as Hugging Face artifacts (``subnets-export``).

``export_run(run, output)`` writes into ``output``:

* the fine-tuned transformer and its tokenizer as a standard Hugging Face folder
  (``AutoModel.from_pretrained(output)`` and ``AutoTokenizer.from_pretrained(output)`` load them);
* ``task_head.safetensors``: the rest of the trained model (the task head and the scalar mix of
  layers), parameter names as in the run's model, with ``task_head.json`` (the task, its label
  set and the run's config);
* ``pruned-<language>/`` (with ``language=``): the transformer with that language's subnetwork
  baked in (:mod:`subnets.hf.prune`), which computes what the transformer gated by the
  language's mask computes, with the parameter counts before and after;
* ``subnetworks/``: the run's subnetwork set (a subnetwork method only) in the format of
  :class:`~subnets.hf.Subnetworks`, so ``SubnetworkModel.from_pretrained(AutoModel.from_pretrained(output),
  output + "/subnetworks")`` gates the exported transformer as the run did.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from subnets.config import setting
from subnets.files import atomic_write_json, save_safetensors
from subnets.hf.config import SubnetworkConfig
from subnets.hf.hub import Subnetworks
from subnets.hf.prune import prune_units, save_pruned
from subnets.models.gates import UnitGates


def export_run(run: str | os.PathLike, output: str | os.PathLike, checkpoint: str = "best",
               language: str | None = None) -> dict:  # fmt: skip
    """Export the trained run in folder ``run`` (its ``checkpoint``, ``best`` or ``last``) into
    ``output`` (module docstring); with ``language``, also that training language's subnetwork
    baked in: the transformer with the units its mask leaves out removed
    (:func:`~subnets.hf.prune.prune_units`), written to ``output/pruned-<language>``
    (:func:`~subnets.hf.prune.load_pruned` loads it). Returns what was written (paths and
    parameter counts).

    Raises:
        ValueError: ``output`` is the run folder or inside it, or is a file; ``language`` is not
            one of the run's subnetworks.
    """
    from subnets.trained import load_run

    run, output = Path(run), Path(output)
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise ValueError(f"output={output} is inside run={run}: export into a folder of its own")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output={output} is a file; expected a folder")
    trained = load_run(run, checkpoint)
    transformer = trained.model.encoder.transformer
    masks = getattr(trained.method.policy, "masks", None)
    if language is not None and (masks is None or language not in masks):
        raise ValueError(f"language={language}: run={run} has no subnetwork of it (its subnetworks: "
                         f"{', '.join(masks) if masks is not None else 'none, method ' + str(trained.cfg.method.name)})")  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(output)
    trained.tokenizer.save_pretrained(output)
    prefix = "encoder.transformer."
    head = {
        n: p.detach().cpu().contiguous()
        for n, p in trained.model.state_dict().items()
        if not n.startswith(prefix)
    }
    config = OmegaConf.to_container(trained.cfg, resolve=True)
    save_safetensors(output / "task_head.safetensors", head, {"task": config["task"]})
    identity = json.loads((run / "run.json").read_text())
    atomic_write_json(output / "task_head.json", {"task": identity.get("task", {}), "config": config,
                                                  "checkpoint": str(trained.checkpoint), "step": trained.step})  # fmt: skip
    written = {
        "transformer": str(output),
        "task_head": str(output / "task_head.safetensors"),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "head_parameters": sum(t.numel() for t in head.values()),
    }
    if masks is not None:
        cfg = trained.cfg
        policy = str(cfg.method.policy.get("_target_", ""))
        rule = (
            "random" if cfg.method.control_of else "dynamic" if policy.endswith("DynamicMasks") else "static"
        )
        settings = SubnetworkConfig(
            units=str(setting(cfg.masks.units)), keep_ratio=float(cfg.masks.keep_ratio), top_k=cfg.masks.top_k,
            min_per_layer=int(cfg.masks.min_heads_per_layer), rule=rule, apply=str(setting(cfg.method.apply)),
        )  # fmt: skip
        base = {"name": str(trained.cfg.model.name_or_path), "revision": None,
                "model_type": getattr(transformer.config, "model_type", None)}  # fmt: skip
        made_by = (f"subnets' runner: method={cfg.method.name}, task={config['task'].get('_target_', '?')}, "
                   f"model={cfg.model.name_or_path}, "
                   f"seed={cfg.seed}, step {trained.step}; exported from {run} by subnets-export")  # fmt: skip
        Subnetworks(masks, settings, base, made_by).save_pretrained(output / "subnetworks")
        written["subnetworks"] = str(output / "subnetworks")
    if language is not None:
        gates = trained.model.gates
        pruned = copy.deepcopy(transformer)
        pruned_gates = UnitGates(pruned, "both" if len(gates.units) > 1 else next(iter(gates.units)), gates.layout,
                                 check=False)  # fmt: skip
        keep = masks[language].unit_mask
        counts = prune_units(pruned, pruned_gates, keep)
        pruned_gates.remove()
        folder = save_pruned(pruned, keep, gates.units, output / f"pruned-{language}", {"language": language})
        written |= {f"pruned-{language}": str(folder), "parameters_before_pruning": counts["before"],
                    "parameters_after_pruning": counts["after"]}  # fmt: skip
    return written
