"""One exit-code rule for every entry point, and what a Hydra sweep does with a failed job.

Exit codes:
  0    done
  1    the run failed while running: training diverged, or an unexpected error (with its traceback)
  2    refused: a bad config value, option or key (ours or Hydra's), an unreadable or damaged data file or
       checkpoint, a run folder that already holds a run; checked before training starts where it can be
  128 + N  stopped by signal N (143: SIGTERM, 130: SIGINT); the message names the checkpoint that holds the run
A multirun (``-m``) runs every job, then lists the failed ones and exits with the largest of their codes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

REFUSED = 2
FAILED = 1
# set by the task function once a job runs in this process, and by the sweep report: a SystemExit(1) from Hydra
# before that is one of its own command-line or config errors
STATE = {"job_started": False, "reported": False}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


def require(condition: bool, message: str) -> None:
    """A config rule: ``message`` names the offending key and what it must be."""
    if not condition:
        raise ConfigError(message)


class ConfigWarning(UserWarning):
    """A config value that runs but is unlikely to be what was meant."""


class DataError(ValueError):
    """Data that cannot be found or read; the message names the path and the override that fixes it."""


class DataWarning(UserWarning):
    """Data that loads but is unlikely to be what was meant (classes without a single image)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely causes."""


class RunStopped(RuntimeError):
    """The run was stopped by a signal; ``code`` is 128 + the signal's number."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def clean_error_message(err: BaseException) -> str:
    """The error's own message; an error raised in a data loader worker arrives wrapped with the worker's
    traceback, of which only the last line (the original message) is kept."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = type(err).__name__ + ": "
        return last.split(name, 1)[1] if name in last else last
    return text


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN: written as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# each job notes how it ended inside its own folder's Hydra subfolder, so the sweep folder holds job folders only
EXIT_RECORD = ".hydra/contrastive_exit.json"


def _records(sweep_dir: str | Path) -> list[Path]:
    return sorted(Path(sweep_dir).glob(f"**/{EXIT_RECORD}"))


def record_job(code: int, message: str = "") -> None:
    """Inside a multirun job: note how it ended where the sweep's report (in the launching process, while the jobs
    may run in others) finds it."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    path = Path(hc.runtime.output_dir) / EXIT_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"num": hc.job.num, "overrides": list(hc.overrides.task), "code": code, "error": message}
    path.write_text(json.dumps(record))


class SweepReport(HydraCallback):
    """Lists a multirun's failed jobs at its end and exits with the largest of their codes."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        for path in _records(config.hydra.sweep.dir):  # an earlier sweep's, in a reused sweep folder
            path.unlink(missing_ok=True)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        records = sorted((json.loads(p.read_text()) for p in _records(config.hydra.sweep.dir)), key=lambda r: r["num"])
        failed = [r for r in records if r["code"] != 0]
        if not failed:
            return
        # name each job by the overrides that differ between the jobs (the sweep's own axes)
        values: dict[str, set[str]] = {}
        for r in records:
            for item in r["overrides"]:
                values.setdefault(item.split("=", 1)[0], set()).add(item)
        axes = {key for key, seen in values.items() if len(seen) > 1}
        lines = []
        for r in failed:
            named = [item for item in r["overrides"] if item.split("=", 1)[0] in axes] or r["overrides"]
            lines.append(f"#{r['num']} ({' '.join(named)}) exit {r['code']}: {r['error'].splitlines()[0]}")
        print(f"error: {len(failed)} of {len(records)} jobs failed: " + "; ".join(lines), file=sys.stderr)
        STATE["reported"] = True
        raise SystemExit(max(r["code"] for r in failed))


def run_cli(main: Any) -> None:
    """Runs a ``@hydra.main`` function with Hydra's own errors (unknown option, misspelt key, bad override) mapped
    from its exit code 1 to ours for a refused command line, 2."""
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not STATE["job_started"] and not STATE["reported"]:
            raise SystemExit(REFUSED) from None
        raise
