"""A fifth method and a new source of negatives plug in through their own files and one registry line each.

What adding BYOL (Grill et al. 2020) takes, as this test does it: its module (the class below, in
``contrastive/methods/byol.py``), its loss (``byol_loss`` below, in ``contrastive/losses.py``), its preset
(``conf/method/byol.yaml``, written to a search path here), and one line in ``METHODS``. Nothing else names methods:
the summary writes whatever figures the run has, metrics.json carries the method's ``family`` for the report, and the
comparisons sweep every preset of ``conf/method`` (tests/integration/test_sweep.py adds a preset there). A new source
of negatives: its module and a line in ``NEGATIVES``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_cfg
from torch import nn

from contrastive import losses
from contrastive.errors import ConfigError
from contrastive.methods import METHODS, ContrastiveMethod
from contrastive.methods.base import StepOutput
from contrastive.models.key_encoder import MomentumEncoder
from contrastive.negatives import NEGATIVES
from contrastive.negatives.base import Negatives, Step, positive_of, require
from contrastive.report.build import build_report
from contrastive.train import train
from contrastive.validate import validate

K = 8

# conftest's tiny run, one epoch of two steps
RUN = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=none"]


# -- a fifth method: BYOL ---------------------------------------------------------------------------------------
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss: ``2 - 2 cos(p, z)``, mean over the batch (``z`` a target, no gradient)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


class BYOL(ContrastiveMethod):
    """No negatives: each view's prediction regresses the momentum encoder's embedding of the other view."""

    family = "self-distillation"
    built: list[BYOL] = []

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        m = self.cfg.method
        self.key_encoder = MomentumEncoder.from_config(self.cfg, self.backbone, self.projector)
        self.predictor = nn.Sequential(
            nn.Linear(m.proj_out_dim, m.proj_hidden_dim), nn.ReLU(), nn.Linear(m.proj_hidden_dim, m.proj_out_dim)
        )
        BYOL.built.append(self)

    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        MomentumEncoder.check(cfg)

    def contrastive_loss(self, views, step: Step) -> StepOutput:
        (f1, z1), (_, z2) = self.embed(views[0]), self.embed(views[1])
        t1, t2 = self.key_encoder(views[0]), self.key_encoder(views[1])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2
        self.seen = ({0: p1.detach(), 1: p2.detach()}, {0: t1, 1: t2}, float(loss.detach()))
        return StepOutput(loss=loss, features=f1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.key_encoder.update(self.backbone, self.projector, self.progress())


BYOL_YAML = """\
defaults: [/schema/method_instance@_here_, _self_]
name: byol
key_encoder: momentum
negatives: batch
shuffle_bn: false
momentum: 0.99
temperature: 1.0
"""


@pytest.fixture
def byol(monkeypatch, tmp_path):
    presets = tmp_path / "conf" / "method"
    presets.mkdir(parents=True)
    (presets / "byol.yaml").write_text(BYOL_YAML)
    monkeypatch.setitem(METHODS, "byol", BYOL)  # the one registry line
    BYOL.built.clear()
    yield [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    BYOL.built.clear()


def test_a_fifth_method_trains_through_its_own_files_and_one_registry_line(byol, tmp_path):
    run = tmp_path / "runs" / "byol"
    metrics = train(make_cfg([*byol, "method=byol", *RUN], tmp_path=run))
    (model,) = BYOL.built
    assert model.global_step == 2 and metrics["method"] == "byol" and metrics["family"] == "self-distillation"
    assert json.loads((run / "metrics.json").read_text())["family"] == "self-distillation"
    # the last step's loss against the formula, on the predictions and targets it saw
    p, targets, loss = model.seen
    cos = [F.cosine_similarity(p[i], targets[1 - i], dim=1) for i in (0, 1)]
    assert loss == pytest.approx(float(sum((2 - 2 * c).mean() for c in cos) / 2), rel=1e-5)
    # the momentum encoder followed the query path after each step
    assert not torch.equal(model.key_encoder.backbone.net[0].weight, model.backbone.net[0].weight)
    # the report reads the new method and its family from metrics.json alone
    build_report(tmp_path / "runs")
    assert "byol" in (tmp_path / "runs" / "comparison.md").read_text()


# -- a new source of negatives ----------------------------------------------------------------------------------
class RandomNegatives(Negatives):
    """Toy source: every query's negatives are ``num`` random unit vectors drawn afresh each step."""

    def __init__(self, num: int, temperature: float):
        super().__init__()
        self.num, self.temperature = num, temperature
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_config(cls, cfg, num_train: int, shared_keys: bool) -> RandomNegatives:
        return cls(cfg.method.num_negatives, cfg.method.temperature)

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        require(
            cfg.method.num_negatives is not None and cfg.method.num_negatives > 0,
            f"method.num_negatives={cfg.method.num_negatives}: negatives=random needs a count > 0",
        )

    def loss(self, queries, keys, step):
        negatives = torch.randn(self.num, keys[0].shape[1], device=keys[0].device)
        terms = []
        for i, q in queries.items():
            terms.append(losses.info_nce(q, positive_of(i, keys), negatives, self.temperature))
            self.seen.append((q.detach(), positive_of(i, keys).detach(), negatives, terms[-1].detach()))
        return torch.stack(terms).mean(), {}

    def stats(self, probe) -> dict[str, float]:
        return {"negatives_per_query": float(self.num), "dictionary_size": float(self.num)}


@pytest.fixture
def random_source(monkeypatch):
    monkeypatch.setitem(NEGATIVES, "random", RandomNegatives)


def source_cfg(tmp_path, *extra: str):
    return make_cfg(
        [*RUN, "method=simclr", "method.negatives=random", f"method.num_negatives={K}", *extra], tmp_path=tmp_path
    )


def test_a_new_source_trains_in_the_grid_end_to_end(random_source, tmp_path):
    metrics = train(source_cfg(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["negatives_per_query"] == K
    assert metrics["negatives"] == "random" and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_the_new_source_loss_is_info_nce_over_its_negatives(random_source, tmp_path):
    from contrastive.methods import build_method

    model = build_method(source_cfg(tmp_path), 100)
    views = [torch.randn(16, 1, 16, 16) for _ in range(2)]
    model.contrastive_loss(views, model.step_context(torch.arange(16), torch.zeros(16, dtype=torch.long)))
    seen = model.negatives.seen
    assert len(seen) == 2  # method=simclr's preset is symmetric: both views query
    t = model.cfg.method.temperature
    for q, k, negs, term in seen:
        q, k, negs = (F.normalize(x.double(), dim=1) for x in (q, k, negs))
        expected = sum(
            -(q[j] @ k[j] / t) + math.log(math.exp(q[j] @ k[j] / t) + sum(math.exp(q[j] @ n / t) for n in negs))
            for j in range(len(q))
        ) / len(q)
        assert float(term) == pytest.approx(float(expected), rel=1e-5)


def test_the_new_source_checks_its_own_keys(random_source, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.num_negatives=None: negatives=random needs a count > 0"):
        validate(source_cfg(tmp_path, "method.num_negatives=null"))


def test_registries_are_restored():
    assert "byol" not in METHODS and "random" not in NEGATIVES
