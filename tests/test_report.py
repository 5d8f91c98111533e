"""The study report (subnets.report) and the notebook: tables checked by hand on written results,
the significance test on known inputs, and both run end to end on a real tiny multirun."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, TINY
from helpers import python

from subnets import report
from subnets.config import compose_config

UD_ROOT = os.environ.get("SUBNETS_UD_ROOT", str(SHARED / "data" / "ud"))
FIGURES = {"fewshot_las.png", *report.FIGURES}  # the scores figure is named by the primary metric


def write_run(folder, method, seed, fewshot, zeroshot):
    """A results.json as the runner writes it: few-shot repetitions and zero-shot scores per language."""
    run = folder / f"+method={method},seed={seed}"
    run.mkdir(parents=True)
    composed = compose_config([] if method == "baseline" else [f"+method={method}"]).method
    results = {
        "method": method,
        "method_role": {
            "order": composed.report_order,
            "control_of": composed.control_of,
        },  # as the method declares
        "seed": seed,
        "data": "ud",
        "target": {code: {"split": "test", "las": las, "uas": las + 10} for code, las in zeroshot.items()},
        "fewshot": {
            "k": 20,
            "steps": 5,
            "repetitions": 2,
            "languages": {
                code: {"runs": [{"las": v, "uas": v + 10} for v in values]}
                for code, values in fewshot.items()
            },
        },
    }
    (run / "results.json").write_text(json.dumps(results))


@pytest.fixture
def written_study(tmp_path):
    write_run(tmp_path, "baseline", 1, {"xx": [50.0, 52.0], "yy": [30.0, 34.0]}, {"xx": 40.0, "yy": 20.0})
    write_run(tmp_path, "baseline", 2, {"xx": [54.0, 56.0], "yy": [32.0, 36.0]}, {"xx": 42.0, "yy": 24.0})
    write_run(tmp_path, "static", 1, {"xx": [53.0, 55.0], "yy": [31.0, 35.0]}, {"xx": 41.0, "yy": 21.0})
    return tmp_path


def test_table_cells_are_mean_and_sd_over_seeds_and_repetitions(written_study):
    rows = {(r["language"], r["method"]): r for r in report.score_table(report.load_runs(written_study))}
    # baseline xx: 50, 52, 54, 56 -> mean 53, sd sqrt(((-3)^2 + 1 + 1 + 9) / 3) = sqrt(20/3)
    assert rows[("xx", "baseline")]["mean"] == pytest.approx(53.0)
    assert rows[("xx", "baseline")]["sd"] == pytest.approx((20 / 3) ** 0.5)
    assert rows[("xx", "baseline")]["n"] == 4
    # average: mean of the language means (53 and 33) = 43; sd over the (seed, repetition)
    # draws of the language average: (50+30)/2=40, (52+34)/2=43, (54+32)/2=43, (56+36)/2=46
    assert rows[("average", "baseline")]["mean"] == pytest.approx(43.0)
    assert rows[("average", "baseline")]["sd"] == pytest.approx(np.std([40, 43, 43, 46], ddof=1))
    assert rows[("yy", "static")]["mean"] == pytest.approx(33.0)
    assert rows[("yy", "static")]["sd"] == pytest.approx(2 * 2**0.5)
    zero = {
        (r["language"], r["method"]): r
        for r in report.score_table(report.load_runs(written_study), "zeroshot")
    }
    assert zero[("yy", "baseline")]["mean"] == pytest.approx(22.0) and zero[("yy", "baseline")]["n"] == 2


def test_significance_pairs_language_and_seed_against_the_baseline(written_study):
    (entry,) = report.significance(report.load_runs(written_study))
    # static seed 1 vs baseline seed 1: xx 54 - 51 = +3, yy 33 - 32 = +1
    assert entry["method"] == "static" and entry["n"] == 2
    assert entry["mean_gain"] == pytest.approx(2.0)
    assert entry["p"] == pytest.approx(0.5)  # exact: both signs positive, 2 of 4 sign patterns as extreme
    assert entry["significant"] is False


def test_wilcoxon_and_holm_on_known_inputs():
    # n = 5, all positive: W- = 0; exact two-sided p = 2 * P(W- <= 0) = 2 / 2^5
    assert report.wilcoxon_test([1, 2, 3, 4, 5])["p"] == pytest.approx(2 / 32)
    # the smallest difference negative: W- = 1; P(W- <= 1) = 2 / 32 ({} and {1}); two-sided 4 / 32
    assert report.wilcoxon_test([-1, 2, 3, 4, 5])["p"] == pytest.approx(4 / 32)
    assert report.wilcoxon_test([0, 0, 0])["p"] == 1.0
    with pytest.raises(ValueError, match="no paired differences"):
        report.wilcoxon_test([])
    # sorted 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> kept monotone at 0.06
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_report_writes_markdown_csv_and_figures(written_study):
    (written_study / "+method=dynamic,seed=1" / ".hydra").mkdir(parents=True)  # a job that died
    path = report.write_report(written_study)
    text = path.read_text()
    assert f"| xx | 53.00 ± {(20 / 3) ** 0.5:.2f} | 54.00 ± 1.41 |" in text
    assert "static: +2.00 LAS over the baseline" in text and "not significant" in text
    assert "3 runs" in text and "unfinished (no results.json): +method=dynamic,seed=1." in text
    with open(path.parent / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cell = next(
        r
        for r in rows
        if (r["setting"], r["metric"], r["language"], r["method"]) == ("fewshot", "uas", "yy", "static")
    )
    assert float(cell["mean"]) == pytest.approx(43.0) and cell["n"] == "2"
    assert (path.parent / "fewshot_las.png").stat().st_size > 0


def test_report_on_a_folder_without_runs_says_so(tmp_path):
    done = python("subnets.report", tmp_path)
    assert done.returncode != 0 and f"no run folders with results.json under {tmp_path}" in done.stderr


# ------------------------------------------------------------------ a real tiny multirun
TINY_UD = [
    *TINY,
    "languages=ud",
    f"languages.ud_root={UD_ROOT}",
    "languages.train=[ar_pud,cs_pud,ru_pud]",
    "languages.dev=[bg_btb]",
    "languages.target=[hsb_ufal,kk_ktb]",
    "languages.max_train_sentences=60",
    "languages.max_eval_sentences=30",
    "train.steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "dynamic.update_every=3",
    "analysis.conflict_every=3",
    "analysis.cka_sentences=20",
    "fewshot.k=20",
]


needs_ud = pytest.mark.skipif(not os.path.isdir(UD_ROOT), reason=f"real UD data not found at {UD_ROOT}")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """baseline and dynamic, seeds 1 and 2: the tiny model on three parallel PUD treebanks."""
    folder = tmp_path_factory.mktemp("study") / "multi"
    done = python("subnets.train", "-m", "+method=baseline,dynamic", "seed=1,2", *TINY_UD, f"hydra.sweep.dir={folder}",
                  cwd=folder.parent, env={"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@needs_ud
@pytest.mark.shared
def test_report_command_on_a_real_multirun(tiny_study):
    done = python("subnets.report", tiny_study)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tiny_study / "report"
    assert {p.name for p in out.glob("*.png")} == FIGURES
    # one cell by hand: dynamic's few-shot LAS on kk_ktb over both seeds and both repetitions
    values = []
    for path in tiny_study.glob("+method=dynamic*/results.json"):
        values += [r["las"] for r in json.loads(path.read_text())["fewshot"]["languages"]["kk_ktb"]["runs"]]
    assert len(values) == 4
    expected = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |"
    line = next(row for row in done.stdout.splitlines() if row.startswith("| kk_ktb |"))
    assert line.endswith(expected), (line, expected)
    assert "Wilcoxon signed-rank" in done.stdout
    # the analyses were measured and reported: conflict at steps 0, 3, 6; CKA of ar, cs, ru
    runs = report.load_runs(tiny_study)
    assert sorted(report.conflict_over_time(runs)["dynamic"]) == [0, 3, 6]
    cka = report.cka_summary(runs)
    assert len(cka) == 4 and all(c["languages"] == ["ar_pud", "cs_pud", "ru_pud"] for c in cka)
    (typology,) = report.overlap_typology(runs)
    assert typology["method"] == "dynamic" and typology["pairs"] == 3


@needs_ud
@pytest.mark.shared
def test_notebook_runs_on_a_real_multirun(tiny_study):
    import nbclient
    import nbformat

    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["SUBNETS_RUN"] = str(tiny_study)
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    finally:
        del os.environ["SUBNETS_RUN"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)
    assert "dynamic       seed 2" in text and "mean CKA before" in text and "share of negative pairs" in text
    assert (
        report.markdown_table(report.score_table(report.load_runs(tiny_study)), ["baseline", "dynamic"])
        in text
    )


def test_mask_reliability_is_split_half_and_across_seed_agreement_against_chance(written_study):
    from subnets.masks.controls import expected_random_jaccard
    from subnets.masks.subnetwork import Subnetwork, SubnetworkSet

    write_run(written_study, "static", 2, {"xx": [53.0, 55.0], "yy": [31.0, 35.0]}, {"xx": 41.0, "yy": 21.0})
    heads = {1: [[1, 1, 0, 0], [1, 0, 0, 0]], 2: [[1, 0, 1, 0], [1, 0, 0, 0]]}  # xx's masks of seeds 1 and 2
    for seed, mask in heads.items():
        folder = written_study / f"+method=static,seed={seed}" / "masks"
        folder.mkdir()
        masks = SubnetworkSet(2, 4)
        masks["xx"] = Subnetwork(torch.tensor(mask, dtype=torch.bool))
        masks.save(folder / "masks.safetensors")
        halves = {"xx": {"jaccard": 0.5 * seed, "random_jaccard": 0.2, "spearman": 0.6, "disjoint": True}}
        summary = {"sparsity": masks.sparsity(), "jaccard": {"languages": ["xx"], "matrix": [[1.0]]},
                   "reliability": halves}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    [row] = report.mask_reliability(report.load_runs(written_study))
    assert row["method"] == "static" and row["runs"] == 2
    assert row["split_half_jaccard"] == pytest.approx(0.75) and row["split_half_spearman"] == pytest.approx(
        0.6
    )
    # seeds 1 and 2 share 2 of the 4 heads they keep in all: Jaccard 2 / 4
    assert row["seed_jaccard"] == pytest.approx(0.5)
    assert row["seed_random_jaccard"] == pytest.approx(expected_random_jaccard([2, 1], [2, 1], 4))
    text = report.write_report(written_study)
    assert (
        "## Mask reliability" in text.read_text()
        and "| static | 2 | 0.75 (0.20) | 0.60 | 0.50" in text.read_text()
    )


def test_runs_of_one_method_with_other_settings_are_reported_apart_and_against_their_controls(written_study):
    import yaml

    write_run(written_study, "random", 1, {"xx": [52.0, 54.0], "yy": [30.0, 32.0]}, {"xx": 40.0, "yy": 20.0})
    write_run(written_study, "static", 2, {"xx": [57.0, 57.0], "yy": [33.0, 33.0]}, {"xx": 41.0, "yy": 21.0})
    variant = written_study / "+method=static,method.apply=both,seed=1"
    variant.mkdir()
    (variant / "results.json").write_text(
        (written_study / "+method=static,seed=1" / "results.json").read_text()
    )
    for run in written_study.glob("*/results.json"):
        method = json.loads(run.read_text())["method"]
        # every random run sets masks.keep_ratio: it tells random from no other random run, so no label shows it
        extra = (
            ["method.apply=both"]
            if run.parent == variant
            else ["masks.keep_ratio=0.25"]
            if method == "random"
            else []
        )
        overrides = ["name=study", f"+method={method}", *extra, "seed=1"]
        (run.parent / ".hydra").mkdir()
        (run.parent / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    runs = report.load_runs(written_study)
    assert report.methods_of(runs) == ["baseline", "random", "static", "static (method.apply=both)"]
    assert [r.seed for r in runs if r.method == "static"] == [1, 2]  # the variant is not a third seed
    pairs = report.control_pairs(runs)
    assert pairs == [("static", "random"), ("static (method.apply=both)", "random"),
                     ("static (method.apply=both)", "static")]  # fmt: skip
    entries = {(e["method"], e["reference"]): e for e in report.significance(runs, pairs=pairs)}
    # static seed 1 against random seed 1: xx 54 - 53 = +1, yy 33 - 31 = +2 (seed 2 has no random run)
    assert entries[("static", "random")]["mean_gain"] == pytest.approx(1.5)
    assert entries[("static", "random")]["n"] == 2
    assert entries[("static (method.apply=both)", "static")]["mean_gain"] == 0.0
    assert entries[("static (method.apply=both)", "static")]["p"] == 1.0
    # Holm over the three pairs: the two p = 0.5 of identical sign patterns, and p = 1
    assert sorted(e["p_holm"] for e in entries.values()) == pytest.approx([1.0, 1.0, 1.0])
    text = report.write_report(written_study).read_text()
    assert "## Against the random control and the default settings (few-shot LAS)" in text
    assert "static: +1.50 LAS over random" in text
    assert "## Gains over the baseline (zero-shot LAS)" in text


def test_the_development_curve_figure_draws_each_methods_mean_over_seeds(written_study):
    for seed, values in ((1, [30.0, 40.0]), (2, [34.0, 44.0])):
        records = [{"step": 50 * (i + 1), "dev/metric": v} for i, v in enumerate(values)]
        path = written_study / f"+method=baseline,seed={seed}" / "metrics.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 50, "train/loss": 1.0}, *records]))
    figure = report.dev_curve_figure(report.load_runs(written_study))
    (line,) = figure.axes[0].get_lines()  # static has no metrics.jsonl
    assert line.get_label() == "baseline"
    assert list(line.get_xdata()) == [50, 100] and list(line.get_ydata()) == [32.0, 42.0]


def test_the_report_tables_parameter_budgets_beside_the_scores(written_study):
    budgets = {"baseline": (1000, {"xx": 1000}), "static": (1000, {"xx": 400, "yy": 500}),
               "random": (1000, {"xx": 450, "yy": 450})}  # fmt: skip
    write_run(written_study, "random", 1, {"xx": [51.0, 53.0], "yy": [29.0, 33.0]}, {"xx": 40.0, "yy": 20.0})
    for folder in written_study.iterdir():
        path = folder / "results.json"
        results = json.loads(path.read_text())
        trainable, updated = budgets[results["method"]]
        results["parameters"] = {"trainable": trainable, "updated": updated}
        path.write_text(json.dumps(results))
    text = report.write_report(written_study).read_text()
    assert "## Parameter budgets" in text
    # zero-shot: static 31.00 (mean of 41 and 21); few-shot: baseline 43.00 over both seeds and
    # languages. Against the baseline (seed 1): static xx 54 - 51 = +3, yy 33 - 32 = +1, mean +2;
    # random xx 52 - 51 = +1, yy 31 - 32 = -1, mean 0. Against random: static +2 and +2, the baseline
    # -1 and +1. The exact two-sided Wilcoxon p of 2 nonzero pairs is 0.5; Holm over the 2
    # comparisons of each column: 1.
    assert "| static | 1,000 | 450 | 31.00 | 43.50 | +2.00 (p 1) | +2.00 (p 1) |" in text
    assert "| baseline | 1,000 | 1,000 | 31.50 | 43.00 | - | +0.00 (p 1) |" in text
    assert "| random | 1,000 | 450 | 30.00 | 41.50 | +0.00 (p 1) | - |" in text
    entries = {
        e["method"]: e
        for e in report.significance(report.load_runs(written_study), pairs=[("static", "random")])
    }
    assert entries["static"]["mean_gain"] == 2.0 and entries["static"]["p"] == pytest.approx(0.5)
    assert "few-shot vs random |" in text


def test_the_report_tables_the_training_languages_scores_where_runs_have_them(written_study):
    source = {("baseline", 1): 80.0, ("baseline", 2): 82.0, ("static", 1): 90.0}
    for folder in written_study.iterdir():
        path = folder / "results.json"
        results = json.loads(path.read_text())
        las = source[(results["method"], results["seed"])]
        results["source"] = {
            "aa": {"split": "dev", "las": las, "uas": 95.0},
            "bb": {"split": "dev", "las": las + 2, "uas": 95.0},
        }
        path.write_text(json.dumps(results))
    text = report.write_report(written_study).read_text()
    assert "## Source LAS on the training languages (development sets)" in text
    assert "| aa | 81.00 ± 1.41 | 90.00 ± 0.00 |" in text
    # paired by training language and seed: static seed 1 against baseline seed 1, +10 on both languages
    assert (
        "## Gains over the baseline (source LAS)" in text and "static: +10.00 LAS over the baseline" in text
    )


def test_a_rate_sweep_chooses_each_methods_rate_on_the_training_languages_never_the_targets(tmp_path):
    import yaml

    sweep = {  # (method, rate, seed): (the training languages' development LAS, the target's LAS)
        ("lora", 1e-4, 1): (60.0, 45.0), ("lora", 1e-3, 1): (64.0, 40.0), ("lora", 3e-3, 1): (62.0, 50.0),
        ("static", 1e-4, 1): (70.0, 45.0), ("static", 1e-4, 2): (72.0, 45.0), ("static", 1e-3, 1): (71.0, 52.0),
    }  # fmt: skip
    for (method, rate, seed), (source, target) in sweep.items():
        folder = tmp_path / f"{method},{rate},{seed}"
        (folder / ".hydra").mkdir(parents=True)
        results = {"method": method, "seed": seed, "data": "ud", "target": {"xx": {"split": "test", "las": target}},
                   "source": {"aa": {"split": "dev", "las": source - 1}, "bb": {"split": "dev", "las": source + 1}}}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(results))
        overrides = [f"+method={method}", f"train.lr_encoder={rate}", f"seed={seed}", "lora.match=static"]
        if (method, rate) == ("lora", 3e-3):  # the default rate: not on the command line, in the config
            overrides.remove(f"train.lr_encoder={rate}")
            (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"lr_encoder": rate}}))
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    runs = report.load_runs(tmp_path)
    assert report.rate_sweep(runs) == {"lora": {1e-4: [60.0], 1e-3: [64.0], 3e-3: [62.0]},
                                       "static": {1e-4: [70.0, 72.0], 1e-3: [71.0]}}  # fmt: skip
    # lora: 64 at 1e-3 (the target would pick 3e-3); static: 71 at both (mean of two seeds), the smaller
    assert report.chosen_rates(runs) == {"lora": 1e-3, "static": 1e-4}
    text = report.write_report(tmp_path).read_text()
    assert "## Learning rates" in text
    assert "| lora | 60.00 | **64.00** | 62.00 | 0.001 |" in text
    assert "| static | **71.00** | 71.00 | - | 0.0001 |" in text
