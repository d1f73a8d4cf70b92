"""notebooks/compare_architectures.ipynb executes end to end in a Jupyter kernel, at a budget small enough for CI."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "compare_architectures.ipynb"
METHODS = ("simclr", "memory_bank", "moco", "swav")
# 1 epoch of 2 steps per method, small network, fewer evaluation repeats: the notebook's code paths, not its numbers
CI_BUDGET = (
    "backbone.width=8 trainer.limit_train_batches=2 eval.fewshot_seeds=1 method.probe_size=64 method.proj_hidden_dim=64"
)


@pytest.mark.slow  # a minute or two in a Jupyter kernel: .ci/run runs it after the default suite
def test_notebook_trains_four_methods_and_shows_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_OVERRIDES", CI_BUDGET)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    for name in METHODS:
        summary = json.loads((tmp_path / name / "metrics.json").read_text())
        assert summary["method"] == name and summary["epochs"] == 1 and summary["global_steps"] == 2
    assert (tmp_path / "comparison.md").is_file()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == len(list(tmp_path.glob("*.png"))) >= 3
    tables = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert any("| run | method |" in table and all(f"`{name}`" in table for name in METHODS) for table in tables)
