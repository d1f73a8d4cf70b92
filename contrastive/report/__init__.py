"""A folder of runs -> ``comparison.md`` and PNG plots: ``python -m contrastive.report DIR [--out DIR] [--target X]``
reads every ``metrics.json`` below DIR (a Hydra multirun folder or any folder of run folders);
:func:`build_report` does the same from Python and returns the report as data.

``runs`` loads run folders and groups them (seeds of one configuration are one group, copies of one seed counted
once), ``stats`` holds the intervals and the tests behind the verdicts (paired or Welch's t, equivalence within a
margin, Holm's correction, the seeds that would decide an open comparison), ``tables``, ``plots`` and ``claims`` the
report's parts, ``build`` puts them together.
"""

from contrastive.report.build import Report, build_report, main
from contrastive.report.claims import SWAV_MARGIN, Claim, survey_claims
from contrastive.report.runs import (
    NoRunsError,
    Run,
    compare_runs,
    distinct_runs,
    load_runs,
    run_groups,
    run_labels,
    swept_keys,
)
from contrastive.report.stats import (
    DEFAULT_MARGINS,
    FAILS,
    HOLDS,
    TOO_FEW,
    UNDECIDED,
    UNMEASURED,
    Comparison,
    compare,
    holm,
)
from contrastive.report.tables import budget_line

__all__ = [
    "DEFAULT_MARGINS",
    "FAILS",
    "HOLDS",
    "SWAV_MARGIN",
    "TOO_FEW",
    "UNDECIDED",
    "UNMEASURED",
    "Claim",
    "Comparison",
    "NoRunsError",
    "Report",
    "Run",
    "budget_line",
    "build_report",
    "compare",
    "compare_runs",
    "distinct_runs",
    "holm",
    "load_runs",
    "main",
    "run_groups",
    "run_labels",
    "survey_claims",
    "swept_keys",
]
