"""A run's metrics: one JSON record per logged step in ``metrics.jsonl``, mirrored to W&B."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from subnets.config import setting
from subnets.files import append_jsonl


class Tracker:
    """Writes ``<folder>/metrics.jsonl`` and, once ``start_wandb`` was called, a W&B run
    (its id kept in ``<folder>/wandb_id`` so that a resumed run continues it). A tracker made
    with ``enabled=False`` (processes other than rank 0) does nothing."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled
        self.wandb_run = None

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"

    def start_wandb(self, settings: Any, name: str, config: dict) -> None:
        """Start (or resume) the W&B run of this folder (``settings``: ``wandb.*``) in the mode
        ``wandb_mode`` gives; ``disabled`` starts nothing (no process, no files)."""
        mode = wandb_mode(setting(settings.mode))
        if not self.enabled or mode == "disabled":
            return
        import wandb

        id_file = self.folder / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.wandb_run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group or name,
            name=f"{name}/{self.folder.name}",
            dir=str(self.folder),
            mode=mode,
            config=config,
            id=run_id,
            resume="allow",
            tags=list(settings.tags),
            settings=wandb.Settings(silent=not settings.verbose),
        )

    def log(self, step: int, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Append ``record`` at ``step`` to metrics.jsonl and send it, and any matplotlib
        ``images``, to W&B."""
        if not self.enabled:
            return
        record = {"step": step, **record}
        append_jsonl(self.metrics_path, record)
        if self.wandb_run is not None:
            import wandb

            media = {k: wandb.Image(v) for k, v in (images or {}).items()}
            self.wandb_run.log({**{k: v for k, v in record.items() if k != "step"}, **media}, step=step)

    def close(self) -> None:
        """Finish the W&B run (each Hydra job gets its own)."""
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


_MODES = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "run": "online",
    "dryrun": "offline",
}


def wandb_mode(configured: str | None) -> str:
    """The W&B mode of a run: ``wandb.mode`` when a config or the command line sets it, else
    the ``WANDB_MODE`` environment variable (W&B's own names, ``dryrun`` and ``run`` included),
    else ``offline``."""
    if configured is not None:
        return configured
    value = os.environ.get("WANDB_MODE", "").strip()
    if not value:
        return "offline"
    if value not in _MODES:
        raise ValueError(f"WANDB_MODE={value!r}: expected one of {', '.join(_MODES)} (or set wandb.mode)")
    return _MODES[value]
