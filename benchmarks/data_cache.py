"""Reading a run's data with and without the treebank cache (subnets.data.cache).

Reads and tokenizes every split the UD study (``+experiment=ud_fewshot``, budget=cpu) uses, as a
run's set-up does, three ways in one process: without the cache, with an empty cache (the first
job of a sweep, which fills it) and with the filled cache (every later job). Prints the seconds
of each and the ratios against no cache.

Needs SUBNETS_UD_ROOT (default ../shared/data/ud) and SUBNETS_E5_PATH
(default ../shared/models/multilingual-e5-small).

Usage::

    python benchmarks/data_cache.py
    python benchmarks/data_cache.py --smoke      # one language each way, 40 sentences: does it run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from shared_paths import e5_path, ud_root

from subnets.config import compose_config
from subnets.data.cache import DataCache
from subnets.data.languages import data_root, load_run_data
from subnets.models.encoder import load_pretrained
from subnets.tasks import Parsing


def read(cfg, tokenizer, cache: DataCache) -> tuple[float, int]:
    start = time.perf_counter()
    data = load_run_data(cfg.languages, cfg.fewshot, data_root(cfg.languages, Path(".")), Parsing(),
                         seed=cfg.seed, cache=cache)  # fmt: skip
    data.tokenize(tokenizer, cache)
    return time.perf_counter() - start, sum(len(d) for d in data.all())


SMOKE = ["languages.train=[en_ewt]", "languages.dev=[bg_btb]", "languages.target=[fi_tdt]",
         "languages.max_train_sentences=40", "languages.max_eval_sentences=40"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds): does it run")
    smoke = parser.parse_args().smoke
    cfg = compose_config(["+experiment=ud_fewshot", "+method=baseline", f"languages.ud_root={ud_root()}",
                          f"model.name_or_path={e5_path()}", *(SMOKE if smoke else [])])  # fmt: skip
    _, tokenizer = load_pretrained(e5_path())
    with tempfile.TemporaryDirectory() as folder:
        none, sentences = read(cfg, tokenizer, DataCache(None))
        cold, _ = read(cfg, tokenizer, DataCache(folder))
        warm, _ = read(cfg, tokenizer, DataCache(folder))
    data = "smoke setting, UD data" if smoke else "UD study data"
    print(f"{data} ({sentences} sentences), read and tokenized with the e5-small tokenizer:")
    print(f"  no cache     {none:6.2f} s")
    print(f"  cold cache   {cold:6.2f} s   {cold / none:.2f}x (the first job of a sweep fills it)")
    print(f"  warm cache   {warm:6.2f} s   {warm / none:.2f}x (every later job)")


if __name__ == "__main__":
    main()
