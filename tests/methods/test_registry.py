"""A new method and a new source of negatives plug in through the registries alone: a toy of each, registered in the
real registries for one test (restored after), trains for a step end to end through ``train(cfg)``.

What a real new method touches: ``contrastive/methods/<name>.py``, a line in ``contrastive/methods/__init__.py``,
``conf/method/<name>.yaml``, and its loss in ``contrastive/losses.py`` if the loss is new (plus a schema dataclass in
``contrastive/config.py`` if it has keys no schema has). A new source of negatives: its file in
``contrastive/negatives/`` and a line in ``contrastive/negatives/__init__.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_cfg

from contrastive import losses
from contrastive.config import ConfigError, validate
from contrastive.methods import METHODS, InstanceDiscrimination
from contrastive.negatives import NEGATIVES
from contrastive.negatives.base import Negatives, require
from contrastive.train import train

K = 8


class RandomNegatives(Negatives):
    """Toy source: every query's negatives are ``method.num_negatives`` random unit vectors drawn afresh each step."""

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        require(
            cfg.method.num_negatives is not None and cfg.method.num_negatives > 0,
            f"method.num_negatives={cfg.method.num_negatives}: negatives=random needs a count > 0",
        )

    def __init__(self, method):
        super().__init__(method)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def loss(self, queries, keys, other, index, labels, logs):
        t = self.method.cfg.method.temperature
        negatives = torch.randn(self.method.cfg.method.num_negatives, keys[0].shape[1], device=keys[0].device)
        terms = []
        for i, q in queries.items():
            terms.append(losses.info_nce(q, keys[other(i)], negatives, t))
            self.seen.append((q.detach(), keys[other(i)].detach(), negatives, terms[-1].detach()))
        return torch.stack(terms).mean()

    def stats(self) -> dict[str, float]:
        k = float(self.method.cfg.method.num_negatives)
        return {"negatives_per_query": k, "dictionary_size": k}


class Toy(InstanceDiscrimination):
    """Toy method: instance discrimination that keeps its instances for the test to read."""

    built: list[Toy] = []

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        Toy.built.append(self)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)
    monkeypatch.setitem(NEGATIVES, "random", RandomNegatives)
    Toy.built.clear()
    yield
    Toy.built.clear()


def toy_cfg(tmp_path, *extra: str):
    return make_cfg(
        [
            "data=digits",
            "data.batch_size=16",
            "backbone.width=4",
            "method.proj_hidden_dim=16",
            "method.proj_out_dim=8",
            "method.probe_size=16",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "eval.init=false",
            "eval.pixels=false",
            "eval.final=false",
            "logger=none",
            "method=simclr",
            "method.name=toy",
            "method.negatives=random",
            f"method.num_negatives={K}",
            *extra,
        ],
        fast=False,
        tmp_path=tmp_path,
    )


def test_toy_method_and_toy_negatives_train_a_step_end_to_end(registered, tmp_path):
    metrics = train(toy_cfg(tmp_path))
    (model,) = Toy.built
    assert model.global_step == 1 and metrics["method"] == "toy"
    assert json.loads((tmp_path / "metrics.json").read_text())["negatives_per_query"] == K
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # the loss the step used is InfoNCE over the toy's negatives, recomputed by hand
    seen = model.negatives.seen
    assert len(seen) == 2  # method=simclr's preset is symmetric: both views query
    for q, k, negs, term in seen:
        q, k, negs = (torch.nn.functional.normalize(x.double(), dim=1) for x in (q, k, negs))
        t = model.cfg.method.temperature
        expected = sum(
            -(q[j] @ k[j] / t) + math.log(math.exp(q[j] @ k[j] / t) + sum(math.exp(q[j] @ n / t) for n in negs))
            for j in range(len(q))
        ) / len(q)
        assert float(term) == pytest.approx(float(expected), rel=1e-5)


def test_toy_source_checks_its_own_keys(registered, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.num_negatives=None: negatives=random needs a count > 0"):
        validate(toy_cfg(tmp_path, "method.num_negatives=null"))


def test_registries_are_restored():
    assert "toy" not in METHODS and "random" not in NEGATIVES
