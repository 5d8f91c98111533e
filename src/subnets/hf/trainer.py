"""Training subnetworks with the Hugging Face ``Trainer``:
[SubnetworkTrainer][subnets.hf.trainer.SubnetworkTrainer].

What it adds to ``transformers.Trainer`` for a [SubnetworkModel][subnets.hf.SubnetworkModel]:

* the optimizer is wrapped in [MaskedOptimizer][subnets.optim.MaskedOptimizer]: weights a step's
  languages do not own get exactly no update, AdamW's decay and moments included (a callback that
  zeroes gradients cannot do this: AdamW still decays them and its moments still move them);
* each example's language comes from the dataset's ``language`` column (kept past
  ``remove_unused_columns``, taken out before the collator pads);
* gradients outside the step's subnetworks are zeroed before clipping, so ``max_grad_norm``
  measures what the step updates (as in subnets' runner);
* the dynamic rule's moving average of ``|dL/dgate|`` is fed every step and masks are re-selected
  every ``update_every`` steps;
* sparsity and overlap go through the Trainer's own logging (``report_to``);
* the masks (and the dynamic rule's state) are saved with every checkpoint and restored by
  ``train(resume_from_checkpoint=...)``, so a resumed run gives the uninterrupted run's masks
  and results;
* ``languages_per_batch="one"`` draws batches of one language with temperature sampling
  ([LanguageGroupedSampler][subnets.hf.trainer.LanguageGroupedSampler], as subnets' runner); ``"mixed"``
  (default) keeps the Trainer's shuffled batches, each example gated by its own language.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback

from subnets.data.sampling import LanguageSampler
from subnets.files import load_safetensors, save_safetensors
from subnets.hf import updates
from subnets.hf.model import LANGUAGE_COLUMN, SubnetworkModel
from subnets.masks.subnetwork import SubnetworkSet
from subnets.optim.masked import MaskedOptimizer

STATE_FOLDER = "subnetworks"
STATE_FILE = "state.safetensors"


class LanguageCollator:
    """Takes the ``language`` column out of the examples, collates the rest with ``collator``,
    and adds the codes back as a list (``batch["language"]``)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: Sequence[dict]) -> dict:
        if examples and LANGUAGE_COLUMN not in examples[0]:
            raise _without_language("a batch", examples[0])
        languages = [str(example[LANGUAGE_COLUMN]) for example in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != LANGUAGE_COLUMN} for e in examples])
        batch[LANGUAGE_COLUMN] = languages
        return batch


class LanguageGroupedSampler(torch.utils.data.Sampler):
    """Indices in runs of ``batch_size`` of one language: the language of each batch is drawn with
    probability proportional to ``size ** alpha`` ([LanguageSampler][subnets.data.LanguageSampler]), and
    each language's examples are walked in a new random order every epoch. Determined by the
    seed and the epoch (``set_epoch``), so a resumed ``Trainer`` replays it exactly.

    Args:
        languages: each example's language code (a dataset's ``language`` column).
        batch_size: the per-device batch size (every language needs that many examples).
    """

    def __init__(self, languages: Sequence[str], batch_size: int, alpha: float = 0.5, seed: int = 0):
        self.batch_size, self.alpha, self.seed, self.epoch = batch_size, alpha, seed, 0
        self.indices: dict[str, list[int]] = {}
        for i, code in enumerate(languages):
            self.indices.setdefault(str(code), []).append(i)
        small = {code: len(v) for code, v in self.indices.items() if len(v) < batch_size}
        if small:
            raise ValueError(f"language-grouped batches of {batch_size}: too few examples in {small}")
        self.batches = math.ceil(len(languages) / batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self):
        sizes = {code: len(v) for code, v in self.indices.items()}
        sampler = LanguageSampler(sizes, self.batch_size, self.alpha, seed=self.seed * 100_003 + self.epoch)
        for _ in range(self.batches):
            code, positions = sampler.next()
            yield from (self.indices[code][p] for p in positions)


class SubnetworkTrainer(Trainer):
    """``transformers.Trainer`` for a [SubnetworkModel][subnets.hf.SubnetworkModel] (module docstring);
    the other arguments are the ``Trainer``'s.

    Args:
        languages_per_batch: ``"mixed"`` (the Trainer's batches, per-example gates) or ``"one"``
            ([LanguageGroupedSampler][subnets.hf.trainer.LanguageGroupedSampler]).
        language_alpha: the temperature exponent of language-grouped batches.
    """

    def __init__(self, model: SubnetworkModel, *args, languages_per_batch: str = "mixed",
                 language_alpha: float = 0.5, **kwargs):  # fmt: skip
        if not isinstance(model, SubnetworkModel):
            raise TypeError(
                f"SubnetworkTrainer trains a SubnetworkModel (subnets.hf.with_subnetworks), got {type(model).__name__}"
            )
        if languages_per_batch not in ("mixed", "one"):
            raise ValueError(f"languages_per_batch={languages_per_batch!r}: expected 'mixed' or 'one'")
        super().__init__(model, *args, **kwargs)
        self.languages_per_batch, self.language_alpha = languages_per_batch, language_alpha
        if self.data_collator is not None and not isinstance(self.data_collator, LanguageCollator):
            self.data_collator = LanguageCollator(self.data_collator)
        self._step_prepared = False
        self.add_callback(_MaskedStepCallback(self))

    # -------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            import inspect

            names = list(inspect.signature(self.model.model.forward).parameters)
            self._signature_columns = [*names, LANGUAGE_COLUMN, "label", "label_ids", *self.label_names]

    def _get_train_sampler(self, *args, **kwargs):
        if self.languages_per_batch == "mixed":
            return super()._get_train_sampler(*args, **kwargs)
        dataset = args[0] if args else kwargs.get("train_dataset", self.train_dataset)
        columns = getattr(dataset, "column_names", None)
        if columns is not None and LANGUAGE_COLUMN not in columns:
            raise _without_language("language-grouped batches of training data", columns)
        return LanguageGroupedSampler(dataset[LANGUAGE_COLUMN], self.args.per_device_train_batch_size,
                                      self.language_alpha, self.args.seed)  # fmt: skip

    # -------------------------------------------------------------- the masked update
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(optimizer, MaskedOptimizer):
            self.optimizer = MaskedOptimizer(optimizer, self.model.named_parameters())
        return self.optimizer

    def training_step(self, *args, **kwargs):
        self._step_prepared = False
        return super().training_step(*args, **kwargs)

    def _prepare_step(self) -> None:
        if not self._step_prepared:
            self.model.before_optimizer_step(self.optimizer)
            self._step_prepared = True

    def _clip_grad_norm(self, model):  # transformers 5: before clipping
        self._prepare_step()
        return super()._clip_grad_norm(model)

    # -------------------------------------------------------------- logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # training logs
            logs = {**logs, **updates.summary(self.model)}
        return super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.model.save_pretrained(output_dir)
            save_subnetwork_state(self.model, os.path.join(output_dir, STATE_FOLDER))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=self.model.model)
        load_subnetwork_state(self.model, os.path.join(resume_from_checkpoint, STATE_FOLDER))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class _MaskedStepCallback(TrainerCallback):
    """Prepares the masked step before the optimizer step (where the Trainer has no
    ``_clip_grad_norm`` to hook, transformers 4, and clipping is off) and counts it after."""

    def __init__(self, trainer: SubnetworkTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, *args, **kwargs):
        self.trainer._prepare_step()

    def on_optimizer_step(self, *args, **kwargs):
        self.trainer.model.after_optimizer_step()


def _without_language(what: str, columns) -> ValueError:
    return ValueError(f"{what} without a '{LANGUAGE_COLUMN}' column (columns: {', '.join(columns)}): "
                      "SubnetworkTrainer needs each example's language code; with "
                      "remove_unused_columns=True it is kept, add it with dataset.add_column")  # fmt: skip


def save_subnetwork_state(model: SubnetworkModel, folder: str) -> None:
    """The masks, the dynamic rule's averages and the step count of ``model`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    model.masks.save(os.path.join(folder, "masks.safetensors"))
    state = model.subnetwork_state()
    tensors = {
        f"ema/{code}": v.contiguous() for code, v in ((state["ema"] or {}).get("averages") or {}).items()
    }
    header = {"steps": state["steps"], "counts": (state["ema"] or {}).get("counts")}
    save_safetensors(os.path.join(folder, STATE_FILE), tensors, header)


def load_subnetwork_state(model: SubnetworkModel, folder: str) -> None:
    """What [save_subnetwork_state][subnets.hf.trainer.save_subnetwork_state] wrote, back into ``model``."""
    masks_path = os.path.join(folder, "masks.safetensors")
    if not os.path.isfile(masks_path):
        raise FileNotFoundError(
            f"{folder}: no masks.safetensors; the checkpoint was not written by SubnetworkTrainer"
        )
    tensors, header = load_safetensors(os.path.join(folder, STATE_FILE), what="subnetwork state")
    averages = {key.split("/", 1)[1]: v for key, v in tensors.items() if key.startswith("ema/")}
    ema = {"averages": averages, "counts": header["counts"]} if header.get("counts") is not None else None
    masks = SubnetworkSet.load(masks_path)
    model.load_subnetwork_state({"masks": masks.state_dict(), "ema": ema, "steps": header["steps"]})


__all__ = ["LanguageCollator", "LanguageGroupedSampler", "SubnetworkTrainer", "load_subnetwork_state",
           "save_subnetwork_state"]  # fmt: skip
