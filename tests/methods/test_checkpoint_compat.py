"""Checkpoints written before the methods were split into components (commit 1dbae36, ``tests/data/
make_checkpoints_v1.py``) load into today's modules with every tensor under its old name and value, and resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from omegaconf import OmegaConf

from contrastive.checkpoints import read_checkpoint
from contrastive.methods import build_method
from contrastive.train import train

DATA = Path(__file__).resolve().parents[1] / "data"  # tests/data


def data_script(name: str):
    """A script of tests/data (standalone, not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_writer = data_script("make_checkpoints_v1")
RUNS, TINY = _writer.RUNS, _writer.TINY

# the names the old code gave the state of each component; loading renames them (``legacy_names`` of the method)
EXPECTED = {
    "simclr": set(),
    "moco": {"momentum", "queue.keys", "queue.index", "queue.written_at", "queue.ptr"},
    "memory_bank": {"log_z", "bank.features", "bank.written_at"},
    "swav": {"prototypes.weight", "queue.features", "queue.ptr", "queue.filled"},
    "momentum_bank": {"momentum", "bank.features", "bank.written_at"},
    "momentum_batch": {"momentum"},
}
SHARED = ("backbone.", "projector.", "probe.", "key_backbone.", "key_projector.")


@pytest.mark.parametrize("name", list(RUNS))
def test_old_checkpoint_loads_with_the_same_names_and_values(name):
    saved = read_checkpoint(DATA / "checkpoints_v1" / f"{name}.ckpt")
    state = saved["state_dict"]
    assert {k for k in state if not k.startswith(SHARED)} == EXPECTED[name]
    assert any(k.startswith("key_backbone.") for k in state) == (name in ("moco", "momentum_bank", "momentum_batch"))
    model = build_method(OmegaConf.create(saved["hyper_parameters"]["cfg"]), saved["hyper_parameters"]["num_train"])
    model.load_state_dict(state, strict=True)
    model.on_load_checkpoint(saved)
    own, renamed = model.state_dict(), type(model).upgrade_state_dict(state)
    assert own.keys() == renamed.keys() and len(renamed) == len(state)
    for key, value in renamed.items():
        assert own[key].dtype == value.dtype and torch.equal(own[key], value), key
    if "drift_probe" in saved:  # the dictionary's drift snapshots came back to its source of negatives
        assert torch.equal(model.negatives.drift.steps, saved["drift_probe"]["steps"])
    if name == "moco":  # the queue's host pointer is read from the loaded buffer, not kept from the fresh one
        assert model.negatives.queue._state()[0] == int(state["queue.ptr"]) != 0
    if name == "memory_bank":
        assert model.negatives.log_z_fixed is None and torch.isfinite(model.negatives.log_z)


@pytest.mark.parametrize("name", list(RUNS))
def test_old_checkpoint_resumes_training(name, tmp_path):
    path = DATA / "checkpoints_v1" / f"{name}.ckpt"
    before = read_checkpoint(path)
    train(make_cfg([*TINY, *RUNS[name], "trainer.max_epochs=2", f"ckpt_path={path}"], fast=False, tmp_path=tmp_path))
    after = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert after["global_step"] == before["global_step"] + 2
    old = build_method(OmegaConf.create(before["hyper_parameters"]["cfg"]), 1).upgrade_state_dict(before["state_dict"])
    assert after["state_dict"].keys() == old.keys()  # saved under today's names
    moved = [k for k, v in old.items() if v.is_floating_point() and not torch.equal(v, after["state_dict"][k])]
    assert any(k.startswith("backbone.") for k in moved)  # it trained from the loaded weights on
    ring = {"moco": "negatives.queue.", "swav": "prototypes.queue."}.get(name)
    if ring:  # the ring went on from the saved pointer
        size = old[ring + ("keys" if name == "moco" else "features")].shape[0 if name == "moco" else 1]
        assert int(after["state_dict"][ring + "ptr"]) == (int(old[ring + "ptr"]) + 2 * 16) % size
    if name in ("memory_bank", "momentum_bank"):
        assert int(after["state_dict"]["negatives.bank.written_at"].max()) == before["global_step"] + 1


@pytest.mark.slow
def test_first_losses_are_those_of_the_code_before_the_split():
    """The first four steps' losses of every method and several cells, fixed seed, as ``tests/data/losses_v1.json``
    recorded them with commit 1dbae36 (the same machine gives them bit for bit; another CPU may round differently)."""
    import json

    recorder = data_script("record_losses")
    LOSS_RUNS, losses = recorder.RUNS, recorder.losses
    recorded = json.loads((DATA / "losses_v1.json").read_text())
    for name, overrides in LOSS_RUNS.items():
        assert losses(overrides) == pytest.approx(recorded[name], rel=1e-5), name
