"""Shared test helpers: compose the real Hydra config with overrides, small and fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from contrastive.config import register_configs

REPO = Path(__file__).resolve().parents[1]  # the checkout; test files sit one level deeper, in tests/<group>/
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
torch.set_num_threads(1)
register_configs()

# Small, quick defaults for a run in a test: synthetic data, tiny CNN, no progress bar, no final linear eval.
FAST = [
    "data=synthetic",
    "data.size=256",
    "data.batch_size=32",
    "backbone.width=8",
    "method.proj_hidden_dim=32",
    "method.proj_out_dim=16",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "eval.linear_epochs=0",
    "eval.fewshot_seeds=1",
    "logger=csv",
]


# the smallest run the crash and reliability tests need: 80 images -> 64 for training: 4 steps of 16 per epoch
TINY = [
    "data.size=80",
    "data.batch_size=16",
    "backbone.width=4",
    "method.probe_size=16",
    "eval.init=false",
    "eval.pixels=false",
    "eval.final=false",
]


def make_cfg(overrides: list[str] | None = None, fast: bool = True, tmp_path: Path | None = None) -> DictConfig:
    extra = list(FAST if fast else []) + list(overrides or [])
    if tmp_path is not None:
        extra.append(f"output_dir={tmp_path}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=extra)


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, fast: bool = True) -> DictConfig:
        return make_cfg(list(overrides), fast=fast, tmp_path=tmp_path)

    return factory


def build(cfg: DictConfig):
    """The data module (set up) and the method a config describes, without a Trainer."""
    from contrastive.data.datamodule import ContrastiveDataModule
    from contrastive.methods import build_method

    dm = ContrastiveDataModule(cfg.data)
    dm.setup("fit")
    return build_method(cfg, dm.num_train), dm


def spy(monkeypatch, obj: Any, name: str) -> list[Any]:
    """Replace ``obj.name`` by a wrapper that records what each call returns."""
    returned: list[Any] = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        returned.append(out)
        return out

    monkeypatch.setattr(obj, name, wrapper)
    return returned


def fixed_bank_encoder(model, assign=setattr):
    """Replace the model's augmentation and key encoder by fixed per-image functions (``assign``: ``setattr``, or
    a monkeypatch's); returns what the pair maps a batch of images to, normalised as the bank stores it."""
    import torch.nn.functional as F

    proj = torch.randn(
        model.cfg.data.image_size**2 * model.cfg.data.channels,
        model.cfg.method.proj_out_dim,
        generator=torch.Generator().manual_seed(5),
    )
    assign(model.augment.large, "forward", lambda images: images.float() / 255)
    assign(model, "key_net", lambda view: view.flatten(1) @ proj)
    return lambda images: F.normalize((images.float() / 255).flatten(1) @ proj, dim=1)


def fit(model, dm, callbacks=(), **trainer_args):
    """A bare Lightning fit on the CPU: no logger, checkpoint or progress bar unless asked."""
    import lightning as L

    args = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    trainer = L.Trainer(callbacks=list(callbacks), **{**args, **trainer_args})
    trainer.fit(model, datamodule=dm)
    return trainer


def collapse_projector(monkeypatch) -> None:
    """Every method ``train`` builds projects all images to one constant vector: an embedding collapse."""
    import contrastive.methods as methods  # train() looks build_method up there at each call

    class ConstantHead(torch.nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.register_buffer("value", torch.nn.functional.normalize(torch.ones(dim), dim=0))

        def forward(self, x):
            return self.value.expand(len(x), -1)

    build_method = methods.build_method

    def collapsed(cfg, num_train):
        model = build_method(cfg, num_train)
        model.projector = ConstantHead(cfg.method.proj_out_dim)
        return model

    monkeypatch.setattr(methods, "build_method", collapsed)
