"""A folder of runs -> ``comparison.md`` and PNG plots: ``python -m contrastive.report DIR [--out DIR] [--target X]``
reads every ``metrics.json`` below DIR (a Hydra multirun folder or any folder of run folders);
:func:`build_report` does the same from Python and returns the report as data.

``runs`` loads run folders and groups them (seeds of one configuration are one group), ``stats`` holds the
intervals and the test behind the verdicts, ``tables``, ``plots`` and ``claims`` the report's parts, ``build``
puts them together.
"""

from contrastive.report.build import Report, build_report, main
from contrastive.report.claims import SWAV_MARGIN, Claim, survey_claims
from contrastive.report.runs import NoRunsError, Run, load_runs, run_groups, run_labels, swept_keys
from contrastive.report.stats import FAILS, HOLDS, UNMEASURED
from contrastive.report.tables import budget_line

__all__ = [
    "FAILS",
    "HOLDS",
    "SWAV_MARGIN",
    "UNMEASURED",
    "Claim",
    "NoRunsError",
    "Report",
    "Run",
    "budget_line",
    "build_report",
    "load_runs",
    "main",
    "run_groups",
    "run_labels",
    "survey_claims",
    "swept_keys",
]
