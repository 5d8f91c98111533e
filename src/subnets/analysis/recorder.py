"""The analyses a run records while it trains (``analysis.*`` settings): gradient conflict
between its languages every ``analysis.conflict_every`` steps and linear CKA before and after
training, written into the run folder's ``analysis/``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from subnets.analysis.conflict import conflict_matrix, probe_batches
from subnets.analysis.similarity import cka_record
from subnets.files import append_jsonl, atomic_write_json

log = logging.getLogger(__name__)


class Analyses:
    """Measures a run's model ([subnets.analysis][]) and writes the records.

    Args:
        settings: the ``analysis.*`` settings.
        folder: the run folder (records go to ``<folder>/analysis/``).
        batcher: the run's [Batcher][subnets.data.dataset.Batcher] (its seed seeds the probes).
        batch_size: ``train.eval_batch_size`` (CKA's forward passes).
        log: the run's logger (metrics.jsonl and W&B).
    """

    def __init__(self, settings: Any, folder: Path, batcher, batch_size: int, log: Callable[[dict], None]):
        self.settings, self.folder, self.batcher, self.batch_size, self.log = (
            settings,
            folder,
            batcher,
            batch_size,
            log,
        )

    def conflict(self, model, train: Mapping, policy, step: int, method: str) -> dict[str, Any]:
        """Cosines between the training languages' gradients of the shared parameters at ``step``
        ([subnets.analysis.conflict_matrix][]; each language's batch of
        ``analysis.conflict_batch_size`` examples is fixed by seed and step, its gates and update
        mask are the method's), appended to ``analysis/gradient_conflict.jsonl``."""
        batches = probe_batches(
            train, self.batcher, self.settings.conflict_batch_size, self.batcher.seed, step
        )
        record = conflict_matrix(model, batches, gates=policy.eval_gates, update_mask=policy.update_mask)
        record = {"step": step, "method": method, **record}
        append_jsonl(self.folder / "analysis" / "gradient_conflict.jsonl", record)
        self.log(
            {
                "analysis/negative_share": record["negative_share"],
                "analysis/mean_cosine": record["mean_cosine"],
            }
        )
        return record

    def cka(self, model, evaluated: Mapping, gates, when: str, step: int) -> dict[str, Any] | None:
        """Linear CKA between the languages that share evaluated examples
        (``subnets.analysis.similarity.cka_record``, up to ``analysis.cka_sentences``), written
        to ``analysis/cka_<when>.json``. ``before`` (at the start) uses the pretrained encoder with
        every unit; later calls use each language's evaluation ``gates``."""
        datasets = {code: data for (_, code), data in evaluated.items()}
        gates = (lambda lang: None) if when == "before" else gates
        record = cka_record(
            model, datasets, self.batcher.collator, self.batch_size, self.settings.cka_sentences, gates
        )
        if record is None:
            log.warning("analysis.cka_sentences: no two evaluated languages share sentence ids; no CKA")
            return None
        record = {"step": step, **record}
        atomic_write_json(self.folder / "analysis" / f"cka_{when}.json", record)
        return record
