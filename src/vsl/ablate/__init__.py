"""``vsl ablate``: the paper's ablations with several seeds, confidence intervals and paired tests.

:mod:`~vsl.ablate.studies` (the studies and their arms), :mod:`~vsl.ablate.runner` (run folders,
command lines, parallel execution and resumption), :mod:`~vsl.ablate.stats` (intervals over seeds,
paired bootstrap over test queries), :mod:`~vsl.ablate.report` (rows, summary, table, figure),
:mod:`~vsl.ablate.run` (``prepare`` / ``run_study`` and the command's options).
"""
from .run import prepare, run_study
from .stats import paired_bootstrap, query_contributions
from .studies import STUDIES, get_study

__all__ = ["STUDIES", "get_study", "prepare", "run_study", "paired_bootstrap", "query_contributions"]
