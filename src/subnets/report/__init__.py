"""The study report: ``python -m subnets.report <folder>`` turns a (multi)run folder into tables,
significance statements and figures.

Every run folder under ``<folder>`` (one that holds ``results.json``) is one method and seed.
Runs of one method with other settings (a sweep over ``method.apply`` or ``masks.keep_ratio``)
are reported apart, labelled by the settings that differ (``static (method.apply=both)``).
The report goes to ``<folder>/report/`` (``--out`` to change it)::

    report.md                 tables, significance statements, analyses, figure links
    results.csv               every table cell: setting, metric, language, method, mean, sd, n
    fewshot_<metric>.png      per-language few-shot primary metric (LAS for parsing), one bar per method (+- sd)
    mask_overlap.png          Jaccard overlap of the languages' head masks (subnetwork methods)
    dynamic_masks.png         sparsity and heads changed per mask update (dynamic methods)
    dev_curve.png             development metric over training (mean over seeds)
    gradient_conflict.png     share of language pairs with conflicting gradients over training
    conflict_matrices.png     gradient cosines between languages at the last measurement
    overlap_typology.png      mask overlap against URIEL syntactic similarity
    cka.png                   linear CKA between parallel languages, before and after training

A sweep over ``train.lr_encoder`` adds the development scores per rate and the rate each method
would continue at ([chosen_rates][subnets.report.rates.chosen_rates]: the training languages'
development sets decide, never the targets).

Each piece is also a function ([load_runs][subnets.report.load_runs],
[score_table][subnets.report.score_table], [significance][subnets.report.significance], the ``*_figure``
functions) for notebooks.
"""

from subnets.report.figures import (
    FIGURES,
    cka_figure,
    conflict_figure,
    conflict_matrices_figure,
    dev_curve_figure,
    dynamic_masks_figure,
    mask_overlap_figure,
    overlap_typology_figure,
    scores_figure,
)
from subnets.report.rates import chosen_rates, rate_sweep, rate_table
from subnets.report.runs import BASELINE, Run, first_per_method, load_runs, methods_of, role, task_record
from subnets.report.scores import (
    cka_summary,
    conflict_over_time,
    control_pairs,
    holm,
    markdown_table,
    mask_reliability,
    overlap_typology,
    score_table,
    scores,
    significance,
    significance_statement,
    wilcoxon_test,
)
from subnets.report.write import write_report

__all__ = [
    "BASELINE", "FIGURES", "Run", "chosen_rates", "cka_figure", "cka_summary", "conflict_figure", "conflict_matrices_figure",
    "conflict_over_time", "control_pairs", "dev_curve_figure", "dynamic_masks_figure", "first_per_method", "holm",
    "load_runs", "markdown_table", "mask_overlap_figure", "mask_reliability", "methods_of", "overlap_typology",
    "overlap_typology_figure", "rate_sweep", "rate_table", "role", "score_table", "scores", "scores_figure", "significance",
    "significance_statement", "task_record", "wilcoxon_test", "write_report",
]  # fmt: skip
