"""A trained run of subnets' runner as Hugging Face artifacts (``subnets-export``).

``export_run(run, output)`` writes into ``output``:

* the fine-tuned transformer and its tokenizer as a standard Hugging Face folder
  (``AutoModel.from_pretrained(output)`` and ``AutoTokenizer.from_pretrained(output)`` load them);
* ``task_head.safetensors``: the rest of the trained model (the task head and the scalar mix of
  layers), parameter names as in the run's model, with ``task_head.json`` (the task, its label
  set and the run's config);
* ``pruned-<language>/`` (with ``language=``): the transformer with that language's subnetwork
  baked in ([subnets.hf.prune][]), which computes what the transformer gated by the
  language's mask computes, with the parameter counts before and after (a run that gated only
  its gradients, ``method.apply=gradient``, computed with every unit: refused unless
  ``force=True``, the difference reported);
* ``lora/<language>/`` (a run that trained its subnetworks alone, ``masks.train=subnetwork``):
  each language's subnetwork, its trained rows and columns and its gates, as an exact peft LoRA
  adapter of the base transformer ([subnets.masks.lora][]), with ``lora/ranks.json``;
* ``subnetworks/``: the run's subnetwork set (a subnetwork method only) in the format of
  [Subnetworks][subnets.hf.Subnetworks], so
  ``SubnetworkModel.from_pretrained(AutoModel.from_pretrained(output), output + "/subnetworks")`` gates the
  exported transformer as the run did.

The export is written into a temporary folder beside ``output`` and renamed into place at the
end, so a failure leaves nothing half-written. An ``output`` that is not empty is refused unless
it holds an earlier export of this command (``task_head.json`` lists the files it wrote) and
``overwrite=True``, which replaces that export whole; a folder holding anything else, or a
training run's folder, is never written into. A LoRA or SHiRA run (``+method=lora``,
``+method=shira``) is exported with its adapter merged into the transformer (peft's
``merge_and_unload``); ``+method=language_lora`` (one LoRA per language) is
refused. The runner builds BERT-style encoders without their pooler, which it does not use: the
export holds the base model's pooler (or, where the base has none, one initialised from the
run's seed), untrained by the run and named in ``task_head.json`` (``untrained``), so that
``AutoModel.from_pretrained`` finds every weight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from torch import nn

from subnets.config import setting
from subnets.files import atomic_write_json, current_umask, save_safetensors
from subnets.hf.config import SubnetworkConfig
from subnets.hf.hub import Subnetworks
from subnets.hf.prune import prune_units, save_pruned
from subnets.models.gates import UnitGates

EXPORT_FILE = "task_head.json"  # an export's record: the run, its config and the files written
log = logging.getLogger(__name__)


def export_run(run: str | os.PathLike, output: str | os.PathLike, checkpoint: str = "best",
               language: str | None = None, overwrite: bool = False, force: bool = False) -> dict:  # fmt: skip
    """Export the trained run in folder ``run`` (its ``checkpoint``, ``best`` or ``last``) into
    ``output`` (module docstring); with ``language``, also that training language's subnetwork
    baked in: the transformer with the units its mask leaves out removed
    ([prune_units][subnets.hf.prune.prune_units]), written to ``output/pruned-<language>``
    ([load_pruned][subnets.hf.prune.load_pruned] loads it). Pruning computes what the run
    computed only for a run whose subnetworks gate its forward pass (``method.apply=forward`` or
    ``both``): under ``method.apply=gradient`` it is refused unless ``force``. The largest
    difference the pruned transformer makes to the run's hidden states on a probe input is
    measured and reported. ``overwrite`` replaces an earlier export in ``output``. Everything is
    checked before anything is written. Returns what was written (paths and parameter counts).

    Raises:
        ValueError: ``output`` is the run folder or inside it, a file, a training run's folder,
            or a folder that is not empty (an earlier export without ``overwrite``, or anything
            else); ``language`` is not one of the run's subnetworks, or its units cannot be
            pruned, or the run gated only its gradients (without ``force``); a
            ``+method=language_lora`` run.
    """
    from subnets.methods.adapters import LanguageLora, LoraPolicy
    from subnets.runs.trained import load_run

    run, output = Path(run), Path(output)
    replace = _check_output(run, output, overwrite)  # before the run is loaded
    trained = load_run(run, checkpoint)
    cfg, policy = trained.cfg, trained.method.policy
    if isinstance(policy, LanguageLora):
        raise ValueError(f"run={run} is a +method=language_lora run: one LoRA per language on a shared base, so no "
                         "single transformer computes what it computes; use the run itself (subnets.evaluate, "
                         "subnets.predict, subnets.load_run)")  # fmt: skip
    transformer = trained.model.encoder.transformer
    if isinstance(policy, LoraPolicy):  # LoRA or SHiRA merged into the weights: a plain transformer
        transformer = copy.deepcopy(transformer).merge_and_unload()
    masks = getattr(policy, "masks", None)
    if language is not None and (masks is None or language not in masks):
        raise ValueError(f"language={language}: run={run} has no subnetwork of it (its subnetworks: "
                         f"{', '.join(masks) if masks is not None else 'none, method ' + str(cfg.method.name)})")  # fmt: skip
    pruned = _pruned(trained, language, force) if language is not None else None
    adapters = (
        _lora_adapters(trained, run)
        if masks is not None and setting(cfg.masks.train) == "subnetwork"
        else None
    )
    complete, untrained, source = _with_every_weight(transformer, str(cfg.model.name_or_path), int(cfg.seed))
    prefix = "encoder.transformer."
    head = {
        n: p.detach().cpu().contiguous()
        for n, p in trained.model.state_dict().items()
        if not n.startswith(prefix)
    }
    config = OmegaConf.to_container(cfg, resolve=True)
    identity = json.loads((run / "run.json").read_text())
    record = {"exported_by": "subnets.export", "run": str(run), "task": identity.get("task", {}), "config": config,
              "checkpoint": str(trained.checkpoint), "step": trained.step}  # fmt: skip
    if untrained:
        record["untrained"] = {"parameters": untrained, "from": source,
                               "why": "the run's model was built without them and does not use them"}  # fmt: skip
    written = {
        "transformer": str(output),
        "task_head": str(output / "task_head.safetensors"),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "head_parameters": sum(t.numel() for t in head.values()),
    }
    if untrained:
        written["untrained_parameters"] = (
            f"{', '.join(untrained)} ({source}; the run neither used nor trained them)"
        )
    with _in_place(output, replace) as folder:
        complete.save_pretrained(folder)
        trained.tokenizer.save_pretrained(folder)
        save_safetensors(folder / "task_head.safetensors", head, {"task": config["task"]})
        if masks is not None:
            _save_subnetworks(trained, masks, transformer, folder / "subnetworks")
            written["subnetworks"] = str(output / "subnetworks")
        if adapters is not None:
            written["lora_ranks"] = adapters(folder / "lora")
            written["lora"] = str(output / "lora")
        if pruned is not None:
            model, keep, counts, difference = pruned
            save_pruned(model, keep, trained.model.gates.units, folder / f"pruned-{language}",
                        {"language": language, "max_difference_on_probe": difference})  # fmt: skip
            written |= {f"pruned-{language}": str(output / f"pruned-{language}"),
                        "parameters_before_pruning": counts["before"], "parameters_after_pruning": counts["after"],
                        "pruned_max_difference": difference}  # fmt: skip
        record["files"] = sorted({*os.listdir(folder), EXPORT_FILE})
        atomic_write_json(folder / EXPORT_FILE, record)
    return written


def _check_output(run: Path, output: Path, overwrite: bool) -> bool:
    """Refuse an ``output`` that export_run must not write (its docstring); returns whether it
    holds an earlier export to replace."""
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise ValueError(f"output={output} is inside run={run}: export into a folder of its own")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output={output} is a file; expected a folder")
    marks = [name for name in ("run.json", ".hydra") if (output / name).exists()]
    if marks:
        raise ValueError(f"output={output} is the folder of a training run (it holds {marks[0]}): export into a "
                         "folder of its own")  # fmt: skip
    present = sorted(os.listdir(output)) if output.is_dir() else []
    if not present:
        return False
    try:
        record = json.loads((output / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or "config" not in record or "checkpoint" not in record:
        raise ValueError(f"output={output} is not empty and holds no export of subnets.export (it holds "
                         f"{', '.join(present[:4])}{', ...' if len(present) > 4 else ''}): choose a new or empty folder")  # fmt: skip
    if not isinstance(record.get("files"), list):
        raise ValueError(f"output={output} holds an export by an earlier version of subnets.export, which did not "
                         "record the files it wrote: remove it yourself, or choose another folder")  # fmt: skip
    foreign = [name for name in present if name not in record["files"]]
    if foreign:
        raise ValueError(f"output={output} holds an earlier export and files it did not write "
                         f"({', '.join(foreign[:4])}): move them away, or choose another folder")  # fmt: skip
    if not overwrite:
        raise ValueError(f"output={output} holds an earlier export (of run={record.get('run', '?')}, step "
                         f"{record.get('step', '?')}): pass overwrite=true to replace it, or choose another folder")  # fmt: skip
    return True


@contextlib.contextmanager
def _in_place(output: Path, replace: bool) -> Iterator[Path]:
    """A temporary folder beside ``output`` to write into, renamed onto ``output`` when the block
    ends (``replace``: the earlier export there is removed then); deleted if the block fails."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield folder
        os.chmod(folder, 0o777 & ~current_umask())
        if replace:
            aside = folder.with_name(folder.name + ".old")
            os.rename(output, aside)
            try:
                os.rename(folder, output)
            except OSError:
                os.rename(aside, output)
                raise
            shutil.rmtree(aside)
        else:
            os.rename(folder, output)  # onto an empty folder, or a new name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pruned(trained, language: str, force: bool) -> tuple[nn.Module, torch.Tensor, dict[str, int], float]:
    """The run's transformer with ``language``'s subnetwork baked in, the units kept, the
    parameter counts and the largest difference it makes to the run's hidden states on a probe."""
    apply = str(setting(trained.cfg.method.apply))
    if apply == "gradient" and not force:
        raise ValueError(f"language={language}: run={trained.folder} was trained with method.apply=gradient: its "
                         "subnetworks chose which weights its steps updated while its forward pass used every unit, "
                         "so the transformer pruned to a subnetwork computes something else; pass force=true to "
                         "export it anyway (the difference is measured and reported)")  # fmt: skip
    transformer, gates = trained.model.encoder.transformer, trained.model.gates
    pruned = copy.deepcopy(transformer)
    pruned_gates = UnitGates(pruned, "both" if len(gates.units) > 1 else next(iter(gates.units)), gates.layout,
                             check=False)  # fmt: skip
    keep = trained.method.policy.masks[language].unit_mask
    counts = prune_units(pruned, pruned_gates, keep)
    pruned_gates.remove()
    ids = torch.randint(transformer.get_input_embeddings().num_embeddings, (2, 12),
                        generator=torch.Generator().manual_seed(0)).to(next(transformer.parameters()).device)  # fmt: skip
    with torch.no_grad(), gates.applied(trained.gates(language)):
        expected = transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    with torch.no_grad():
        actual = pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    difference = float((actual - expected).abs().max())
    (log.warning if apply == "gradient" else log.info)(
        "language=%s: the pruned transformer's hidden states differ from run=%s's by up to %.3g on a probe input "
        "(method.apply=%s)", language, trained.folder, difference, apply,
    )  # fmt: skip
    return pruned, keep, counts, difference


def _with_every_weight(
    transformer: nn.Module, name_or_path: str, seed: int
) -> tuple[nn.Module, list[str], str]:
    """``transformer`` as its class builds it by default, so that ``AutoModel.from_pretrained``
    finds every weight of the export (the runner builds BERT-style encoders without their pooler,
    ``add_pooling_layer=False``). The parameters it lacks come from the base model
    ``name_or_path`` where it has them, else are initialised (``seed``). Returns the model, the
    names of those parameters and where they come from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        complete = type(transformer)(transformer.config)
    missing, unexpected = complete.load_state_dict(transformer.state_dict(), strict=False)
    if not missing or unexpected:
        return transformer, [], ""
    source = f"initialised with seed {seed}, as the base model has none"
    if name_or_path != "tiny":
        base, info = transformers.AutoModel.from_pretrained(name_or_path, output_loading_info=True)
        found = {k: v for k, v in base.state_dict().items() if k in missing and k not in info["missing_keys"]}
        if set(found) == set(missing):
            complete.load_state_dict(found, strict=False)
            source = f"the base model {name_or_path}'s"
    return complete.eval(), sorted(missing), source


def _lora_adapters(trained, run: Path):
    """For a run that trained its subnetworks alone (``masks.train=subnetwork``): a function that
    writes each language's subnetwork as an exact peft LoRA adapter of the base transformer
    ([save_lora_adapters][subnets.masks.lora.save_lora_adapters]) into a folder. The base is
    built as the run built it before training (the pretrained model, or the tiny model of the
    run's seed); its changes are checked before anything is written."""
    from subnets.masks.lora import lora_adapter, save_lora_adapters
    from subnets.models.build import build_encoder

    cfg, policy = trained.cfg, trained.method.policy
    transformer = trained.model.encoder.transformer
    base, _ = build_encoder(cfg.model, seed=int(cfg.seed), tokenizer_folder=run / "tokenizer")
    base = base.to(next(transformer.parameters()).dtype).eval()
    lora_adapter(transformer, base, trained.model.gates, transformer=transformer)  # refuses a shared change
    return lambda folder: save_lora_adapters(transformer, base, policy.masks, trained.model.gates, policy.mode,
                                             folder, transformer=transformer)  # fmt: skip


def _save_subnetworks(trained, masks, transformer: nn.Module, folder: Path) -> None:
    """The run's subnetwork set in the format of [Subnetworks][subnets.hf.hub.Subnetworks]."""
    cfg = trained.cfg
    settings = SubnetworkConfig(**trained.method.policy.settings())  # the names both paths share
    base = {"name": str(cfg.model.name_or_path), "revision": None,
            "model_type": getattr(transformer.config, "model_type", None)}  # fmt: skip
    made_by = (f"subnets' runner: method={cfg.method.name}, task={cfg.task.get('_target_', '?')}, "
               f"model={cfg.model.name_or_path}, "
               f"seed={cfg.seed}, step {trained.step}; exported from {trained.folder} by subnets-export")  # fmt: skip
    Subnetworks(masks, settings, base, made_by).save_pretrained(folder)
