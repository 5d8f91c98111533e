"""A trained run's folder, read back: its config (``run.json``) with the overrides an evaluation
may apply, and the checkpoint a command asks for (``best`` or ``last``, or why it is missing)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from subnets.config import Config, SettingError
from subnets.files import read_json
from subnets.runs.folder import RunFolder

# Settings an evaluation may change: which languages and data, the few-shot protocol, the
# test-time policy for unseen languages, where the model is and what runs it.
EVALUATION_SETTINGS = (
    "languages.",
    "fewshot.",
    "masks.target_policy",
    "model.name_or_path",
    "train.eval_batch_size",
    "train.device",
)
CHECKPOINTS = ("best", "last")


def read_run_config(folder: str | os.PathLike) -> DictConfig:
    """The config a run folder recorded (``run.json``), checked against the schema."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run={folder}: no such folder")
    path = folder / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"run={folder} holds no run of subnets (no run.json): pass the folder a "
                                "training run wrote (outputs/<name>/<overrides>, or its hydra.run.dir)")  # fmt: skip
    saved = read_json(path, "the run's identity")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{path}: expected a JSON object with the run's 'config' (the file is damaged)")
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved["config"])
    except Exception as error:  # OmegaConf's validation errors name the key
        raise ValueError(f"{path}: its config does not fit the settings schema: {error}") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with command-line ``overrides`` (Hydra syntax, e.g. ``languages.target=[xx]``)
    applied; only ``EVALUATION_SETTINGS`` may change, since the rest made the trained model."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = cfg.copy()
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    sections = {o.key_or_group.split(".")[0] for o in parsed} & set(cfg)
    before = {
        name: OmegaConf.to_container(cfg[name]) for name in sections if isinstance(cfg[name], DictConfig)
    }
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise SettingError(f"{override.input_line}: a sweep; evaluate one setting at a time")
        if key == "languages.train" or not key.startswith(EVALUATION_SETTINGS):
            raise SettingError(
                f"{key}: not a setting an evaluation can change (the trained model was made with it); "
                f"these can: {', '.join(k + ('*' if k.endswith('.') else '') for k in EVALUATION_SETTINGS)} "
                "except languages.train (evaluate other languages as languages.dev or languages.target)"
            )
        exists = OmegaConf.select(cfg, key, default=KeyError) is not KeyError
        if override.is_add():  # +key=value: a new entry of a mapping, e.g. a synthetic language
            if exists:
                raise SettingError(f"{override.input_line}: {key} is set already; drop the +")
            nested: Any = override.value()
            for part in reversed(key.split(".")):
                nested = {part: nested}
            cfg = OmegaConf.merge(cfg, nested)
        elif not exists:
            raise SettingError(f"{key}: no such setting (a new entry is added with +{key}=...)")
        else:
            OmegaConf.update(cfg, key, override.value(), merge=False)
    _follow_copies(cfg, cfg.method, before)
    return cfg


def _follow_copies(cfg: DictConfig, node: DictConfig, before: dict[str, Any]) -> None:
    """A recorded config is resolved: a method argument given as ``${masks}`` holds a copy of
    the ``masks`` section. Give such copies of an overridden section its new values."""
    for key, value in node.items():
        if isinstance(value, DictConfig):
            copied = [name for name, old in before.items() if OmegaConf.to_container(value) == old]
            if copied:
                node[key] = cfg[copied[0]].copy()
            else:
                _follow_copies(cfg, value, before)


def checkpoint_file(folder: Path, checkpoint: str) -> Path:
    """The checkpoint file ``checkpoint`` (``best`` or ``last``) of the run in ``folder``; a
    missing file is an error that says what is missing and what is there instead."""
    if checkpoint not in CHECKPOINTS:
        raise SettingError(f"checkpoint={checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    paths = RunFolder(folder)
    last, best, results = paths.last_checkpoint, paths.best_checkpoint, paths.results
    if checkpoint == "last":
        if last.exists():
            return last
        if results.exists():
            raise FileNotFoundError(f"run={folder}: {last} is missing, although the run finished ({results} is "
                                    f"there){'; checkpoint=best uses ' + str(best) if best.exists() else ''}")  # fmt: skip
        raise FileNotFoundError(f"run={folder} has no checkpoint yet ({last}): it has not trained a step")
    if not results.exists():
        if not last.exists():
            raise FileNotFoundError(f"run={folder} has no checkpoint yet ({last}): it has not trained a step")
        raise ValueError(f"run={folder} is unfinished (no results.json): run its command again to finish it "
                         "(it resumes), or pass checkpoint=last to use its last checkpoint as it is")  # fmt: skip
    best_step = read_json(results, "the run's results").get("best_step")
    if best.exists():
        return best
    if best_step is None and last.exists():  # no development languages: the run evaluated its last model
        return last
    if best_step is None:
        raise FileNotFoundError(f"run={folder}: {last} is missing (the run has no development languages, so its "
                                "final evaluation used its last checkpoint)")  # fmt: skip
    raise FileNotFoundError(
        f"run={folder}: {best} is missing, although the run selected its model at step {best_step} "
        f"({results}); pass checkpoint=last to use {last} instead"
        + ("" if last.exists() else f" ({last} is missing too)")
    )
