"""Shared fixtures: tiny configs composed exactly as the command line composes them."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from subnets.config import compose_config

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # and the commands they start
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Tests marked ``first`` (the longest) run first, then the other slow ones, so that under
    ``pytest -n`` no worker starts a long test while the others are finishing."""
    items.sort(
        key=lambda item: (item.get_closest_marker("first") is None, item.get_closest_marker("slow") is None)
    )


SHARED = Path(os.environ.get("SUBNETS_SHARED", REPO.parent / "shared"))
SCORER = SHARED / "tools" / "ud_eval.py"  # the official CoNLL 2018 scorer, used from there


def official_scorer():
    """The official scorer's module (:data:`SCORER`), loaded from ../shared."""
    spec = importlib.util.spec_from_file_location("ud_eval", SCORER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A run small enough for a test (configs/debug/tiny.yaml): 2-layer model, 80 sentences per
# language, 12 steps.
TINY = ["debug=tiny"]


def scores(results: dict) -> dict:
    """A run's results without the wall-clock ``seconds`` (the rest is reproducible)."""
    return {key: value for key, value in results.items() if key != "seconds"}


def tiny_config(*overrides: str):
    """The runner's config with ``debug=tiny`` and ``overrides`` on top."""
    return compose_config([*TINY, *overrides])


SOURCES = ["syn_svo", "syn_sov", "syn_vso", "syn_osv"]  # the default job's training languages


def write_ud_root(folder):
    """The default job's synthetic languages written as a UD root under ``folder`` (tiny sizes)."""
    from subnets.data.synthetic import SyntheticLanguage, write_synthetic_treebanks

    specs = {
        c: SyntheticLanguage(c, **spec) for c, spec in tiny_config().languages.synthetic.languages.items()
    }
    return write_synthetic_treebanks(folder, specs, {"train": 80, "dev": 20, "test": 30}, 0)


@pytest.fixture
def ud_root(tmp_path):
    return write_ud_root(tmp_path / "ud")


def ud_job(root, *extra):
    """The tiny job on the UD root ``root``: the four sources, syn_svo_na for selection, syn_vos as target."""
    return tiny_config("languages.source=ud", f"languages.ud_root={root}", f"languages.train=[{','.join(SOURCES)}]",
                       "languages.dev=[syn_svo_na]", "languages.target=[syn_vos]", *extra)  # fmt: skip


def hashes(folder, skip: str | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path (files under a folder named ``skip`` left out)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and skip not in p.relative_to(folder).parts}  # fmt: skip


def step_on(run, lang: str):
    """One training step of a set-up ``run`` on a batch of ``lang`` (the loop's step, with the
    language chosen instead of drawn), then the policy's after-step hook."""
    batch = run.batches.next_batch(lang, run.cfg.train.batch_size)
    policy = run.method.policy
    result = run.method.strategy.train_on(batch, run.model, run.optimizer, policy,
                                          clip_norm=run.cfg.train.clip_norm, scheduler=run.scheduler)  # fmt: skip
    run.state.step += 1
    policy.after_step(run.state.step, result)
    return result


class Crash(RuntimeError):
    """The simulated crash of :func:`crash_after_checkpoint`."""


def crash_after_checkpoint(monkeypatch, cfg, folder, step: int = 8) -> None:
    """Run ``cfg`` in ``folder`` until the checkpoint at ``step`` is written, then crash."""
    from subnets.training.runner import Run, run

    original = Run.save_checkpoint

    def save_then_crash(self):
        path = original(self)
        if self.state.step == step:
            raise Crash(f"simulated crash after the checkpoint at step {step}")
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(cfg, folder)
    monkeypatch.setattr(Run, "save_checkpoint", original)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """One treebank cache for the session (subnets.data.cache), not the user's."""
    os.environ["SUBNETS_CACHE_DIR"] = str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def mlm_run(tmp_path_factory) -> Path:
    """The tiny BERT after masked language modelling on the synthetic languages (helpers.LEARN):
    a folder holding the ``run`` and its last checkpoint exported to ``export``. Made once a session:
    under pytest -n the first worker that needs it makes it, holding a lock, and the others reuse it."""
    import fcntl

    from helpers import LEARN

    from subnets.hf.export import export_run
    from subnets.training.runner import run

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common folder
    folder = shared / "mlm_run"
    with open(shared / "mlm_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "export" / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            torch.manual_seed(0)
            run(tiny_config("task=mlm", *LEARN), folder / "run")
            export_run(folder / "run", folder / "export", checkpoint="last")
    return folder


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)


def tiny_transformer(
    architecture: str = "bert", attn: str | None = "eager", layers: int = 2, heads: int = 4, seed=0
):
    from subnets.models.encoder import build_tiny_transformer

    model = build_tiny_transformer(
        vocab_size=120, hidden_size=32, num_layers=layers, num_heads=heads, intermediate_size=64,
        max_length=64, architecture=architecture, attn_implementation=attn, seed=seed, pad_token_id=0,
    )  # fmt: skip
    return model.eval()


# Every family of Hugging Face transformer the layouts cover, as a tiny random model built from
# its config (no download): model_type -> (config settings, model class name or None for AutoModel).
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
            "vocab_size": 120}  # fmt: skip
_DECODER = {**_ENCODER, "num_key_value_heads": 2, **_IDS}
_T5 = {"d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 48, "vocab_size": 120}
FAMILIES = {
    "bert": (_ENCODER, None),
    "xlm-roberta": (_ENCODER, None),
    "electra": ({**_ENCODER, "embedding_size": 16}, None),
    "rembert": ({**_ENCODER, "input_embedding_size": 16, "output_embedding_size": 16}, None),
    "distilbert": ({"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "vocab_size": 120}, None),
    "deberta-v2": (_ENCODER, None),
    "xlm": ({"emb_dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 120}, None),
    "albert": ({**_ENCODER, "num_hidden_layers": 3, "embedding_size": 16}, None),
    "modernbert": ({**_ENCODER, "cls_token_id": 1, "sep_token_id": 2, **_IDS}, None),
    "t5": (_T5, "T5EncoderModel"),
    "mt5": (_T5, "MT5EncoderModel"),
    "llama": (_DECODER, None),
    "mistral": (_DECODER, None),
    "qwen2": (_DECODER, None),
    "qwen3": ({**_DECODER, "head_dim": 8}, None),
    "gemma": ({**_DECODER, "head_dim": 8}, None),
    "gemma2": ({**_DECODER, "head_dim": 8}, None),
    "gemma3_text": ({**_DECODER, "head_dim": 8}, None),
    "gpt2": (
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48, "vocab_size": 120, **_IDS},
        None,
    ),  # Conv1D
    "gpt_neox": ({**_ENCODER, **_IDS}, None),  # fused qkv, interleaved per head
    "bloom": ({"hidden_size": 32, "n_layer": 2, "n_head": 4, "vocab_size": 120, **_IDS}, None),
    "falcon": (
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 120,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
            **_IDS,
        },
        None,
    ),  # interleaved per key-value group
}


def tiny_family(model_type: str, attn: str | None = None, seed: int = 0):
    """A tiny random model of ``model_type`` (:data:`FAMILIES`) in eval mode, deterministic for ``seed``."""
    import transformers

    settings, class_name = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    if attn:
        config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if class_name:
            model = getattr(transformers, class_name)(config)
        else:
            model = transformers.AutoModel.from_config(config)
    return model.eval()
