"""The run-folder lock: one live run per folder; a lock left by a killed process is taken over, naming its pid."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
from conftest import TINY, make_cfg

from contrastive.errors import ConfigError
from contrastive.runlock import LOCK_NAME, run_lock
from contrastive.train import train

HOLD = """
import sys, time
from contrastive.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(folder) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_a_second_holder_and_is_removed_after(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).is_file()
        refused = rf"run folder {tmp_path} is in use by another run \(pid {os.getpid()} "
        with pytest.raises(ConfigError, match=refused), run_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path):  # free again
        pass


def test_lock_of_a_live_process_refuses_and_of_a_killed_one_is_cleared(tmp_path, caplog):
    proc = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {proc.pid} on "), run_lock(tmp_path):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).is_file()  # a killed process cannot clean up
    with caplog.at_level(logging.WARNING, logger="contrastive"), run_lock(tmp_path):
        pass
    assert f"cleared a stale lock on the run folder {tmp_path}: pid {proc.pid} on " in caplog.text
    assert "is no longer running" in caplog.text


def test_train_into_a_locked_folder_is_refused_before_any_work(tmp_path):
    with run_lock(tmp_path), pytest.raises(ConfigError, match="is in use by another run"):
        train(make_cfg([*TINY, "trainer.max_epochs=1"], tmp_path=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unwritable_run_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write into the run folder"), run_lock(blocker / "run"):
        pass
