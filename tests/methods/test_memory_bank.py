"""Memory bank (InstDisc/NPID) inside the method: the update and the loss of a real training step, NCE's
normaliser, negative sampling, the bank in checkpoints and on resume, config checks, and the staleness figure."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import build, fit, fixed_bank_encoder, make_cfg, spy
from lightning.pytorch.callbacks import Callback

from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.errors import ConfigError
from contrastive.methods.memory_bank import MemoryBankMethod
from contrastive.negatives import MemoryBank
from contrastive.train import train
from contrastive.validate import validate_with_data

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

BANK = ["method=memory_bank"]
SMALL = ["data.size=96"]  # 76 training images: 2 steps of 32 per epoch


def direct_info_nce(q: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """-log softmax of the positive among [positive | per-query negatives], written as a loop over queries."""
    q, positive, negatives = F.normalize(q, dim=1), F.normalize(positive, dim=1), F.normalize(negatives, dim=2)
    terms = []
    for i in range(len(q)):
        logits = torch.cat([(q[i] * positive[i]).sum().view(1), negatives[i] @ q[i]]) / t
        terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms).mean()


# -- one training step on a hand-made bank ---------------------------------------------------------------------
def one_bank_step(cfg_factory, monkeypatch, written: bool) -> dict[str, Any]:
    """One ``training_step`` of the memory bank method on a bank with known contents (every entry written before,
    or none); records the view, the drawn negatives and the step's contrastive loss."""
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*BANK))
    gen = torch.Generator().manual_seed(1)
    model.negatives.bank.features.copy_(
        F.normalize(torch.randn(model.negatives.bank.features.shape, generator=gen), dim=1)
    )
    if written:
        model.negatives.bank.written_at.copy_(torch.arange(len(model.negatives.bank)) + 100)
    before = model.negatives.bank.features.clone(), model.negatives.bank.written_at.clone()
    views = spy(monkeypatch, model.augment, "forward")
    draws = spy(monkeypatch, model.negatives.bank, "sample_indices")
    outputs = spy(monkeypatch, model, "contrastive_loss")
    images, labels, index = next(iter(dm.train_dataloader()))
    model.training_step([images, labels, index], 0)
    assert len(views) == 1 and len(views[0]) == 1 and len(draws) == 1 and len(outputs) == 1
    with torch.no_grad():  # same weights, same batch, BN in training mode: the step's own embedding
        query = model.projector(model.backbone(views[0][0]))
    return {
        "model": model,
        "index": index,
        "old": before[0],
        "old_written": before[1],
        "query": query,
        "negatives": draws[0],
        "loss": outputs[0].loss.detach(),
    }


@pytest.fixture
def bank_step(cfg_factory, monkeypatch) -> dict[str, Any]:
    return one_bank_step(cfg_factory, monkeypatch, written=True)


def test_first_write_mixes_in_the_random_start_as_the_paper_does(cfg_factory, monkeypatch):
    step = one_bank_step(cfg_factory, monkeypatch, written=False)
    model, index, old, query = step["model"], step["index"], step["old"], step["query"]
    expected = F.normalize(0.5 * old[index] + 0.5 * F.normalize(query, dim=1), dim=1)
    torch.testing.assert_close(model.negatives.bank.features[index], expected, rtol=1e-5, atol=1e-6)
    assert (model.negatives.bank.written_at[index] == 0).all()
    # as in the paper, the positive is the entry as it was, random
    expected = direct_info_nce(query, old[index], old[step["negatives"]], model.cfg.method.temperature)
    torch.testing.assert_close(step["loss"], expected, rtol=1e-5, atol=1e-6)


class BankAtFirstStep(Callback):
    """The bank as the first training step finds it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "features"):
            self.features, self.written = (
                pl_module.negatives.bank.features.clone(),
                pl_module.negatives.bank.written_at.clone(),
            )


@pytest.mark.parametrize("written_before", [False, True])
def test_bank_init_encoder_starts_each_entry_as_its_own_image_encoded(cfg_factory, monkeypatch, written_before):
    model, dm = build(cfg_factory(*BANK, *SMALL, "method.bank_init=encoder"))
    encode = fixed_bank_encoder(model, monkeypatch.setattr)
    if written_before:  # a resumed run: the bank is never filled again
        model.negatives.bank.written_at[3] = 7
    initial = model.negatives.bank.features.clone(), model.negatives.bank.written_at.clone()
    seen = BankAtFirstStep()
    fit(model, dm, callbacks=[seen], max_steps=1)
    if written_before:
        assert torch.equal(seen.features, initial[0]) and torch.equal(seen.written, initial[1])
        return
    images = torch.stack([dm.train_set[i][0] for i in range(dm.num_train)])
    assert [dm.train_set[i][2] for i in range(dm.num_train)] == list(range(dm.num_train))
    torch.testing.assert_close(seen.features, encode(images), rtol=1e-5, atol=1e-6)
    assert (seen.written == 0).all()


def test_bank_init_random_keeps_the_random_start(cfg_factory):
    model, dm = build(cfg_factory(*BANK, *SMALL, "method.bank_init=random"))
    initial = model.negatives.bank.features.clone()
    seen = BankAtFirstStep()
    fit(model, dm, callbacks=[seen], max_steps=1)
    assert torch.equal(seen.features, initial) and (seen.written == -1).all()


def test_step_writes_normalized_mix_of_old_entry_and_new_embedding(bank_step):
    model, index, old, query = bank_step["model"], bank_step["index"], bank_step["old"], bank_step["query"]
    assert model.negatives.bank.momentum == 0.5
    expected = F.normalize(0.5 * old[index] + 0.5 * F.normalize(query, dim=1), dim=1)
    torch.testing.assert_close(model.negatives.bank.features[index], expected, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(len(old), dtype=torch.bool)
    untouched[index] = False
    assert untouched.sum() == len(old) - len(index)
    assert torch.equal(model.negatives.bank.features[untouched], old[untouched])
    written = model.negatives.bank.written_at
    assert (written[index] == 0).all()  # global_step of the step (no trainer: 0)
    assert torch.equal(written[untouched], bank_step["old_written"][untouched])


def test_step_loss_is_info_nce_with_pre_update_entry_as_positive(bank_step):
    model, index, old, query = bank_step["model"], bank_step["index"], bank_step["old"], bank_step["query"]
    neg = bank_step["negatives"]
    assert neg.shape == (len(index), model.num_train - 1)  # null num_negatives: the whole bank but itself
    assert not (neg == index[:, None]).any()
    t = model.cfg.method.temperature
    expected = direct_info_nce(query, old[index], old[neg], t)
    torch.testing.assert_close(bank_step["loss"], expected, rtol=1e-5, atol=1e-6)
    # the updated entry as positive would give a clearly different (smaller) loss: the test can tell them apart
    after = direct_info_nce(query, model.negatives.bank.features[index], old[neg], t)
    assert float(expected - after) > 1e-3


# -- NCE ------------------------------------------------------------------------------------------------------
def test_nce_fixes_log_z_from_the_first_batch_and_keeps_it(cfg_factory, monkeypatch):
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*BANK, *SMALL, "method.loss=nce", "method.nce_z=first_batch"))
    assert torch.isnan(model.negatives.log_z)
    embeds = spy(monkeypatch, model, "embed")
    draws = spy(monkeypatch, model.negatives.bank, "sample_indices")
    outputs = spy(monkeypatch, model, "contrastive_loss")

    class Record(Callback):
        def __init__(self) -> None:
            self.bank0: torch.Tensor | None = None
            self.index0: torch.Tensor | None = None
            self.log_z: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.bank0 is None:
                self.bank0, self.index0 = pl_module.negatives.bank.features.clone(), batch[2].clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.log_z.append(float(pl_module.negatives.log_z))

    record = Record()
    fit(model, dm, [record], max_epochs=2, limit_val_batches=0)
    assert len(record.log_z) == 4
    assert all(math.isfinite(float(o.loss.detach())) for o in outputs)
    assert math.isfinite(record.log_z[0]) and record.log_z == [record.log_z[0]] * 4

    # log Z = log(n * mean exp(v . f / T)) over the first batch's K + 1 sampled entries, the positive among them
    # (lemniscate's NCEAverage.py), from the bank as it stands (nce_z=first_batch)
    t, n = model.cfg.method.temperature, model.num_train
    q = F.normalize(embeds[0][1].detach(), dim=1)
    neg = torch.einsum("nd,nkd->nk", q, record.bank0[draws[0]])
    pos = (q * record.bank0[record.index0]).sum(1)  # v+: the sample's own entry before the update
    sampled = torch.cat([pos[:, None], neg], 1)
    log_z = float(torch.log(torch.exp(sampled.double() / t).mean() * n))
    assert record.log_z[0] == pytest.approx(log_z, rel=1e-5, abs=1e-5)

    # the loss of the first step: -log h(v+) - sum_j log(1 - h(v_j)), h = P / (P + K/n), P = exp(v . f / T) / Z

    def h(v: torch.Tensor) -> torch.Tensor:
        p = torch.exp(v.double() / t - log_z)
        return p / (p + neg.shape[1] / n)

    expected = (-torch.log(h(pos)) - torch.log(1 - h(neg)).sum(1)).mean()
    assert float(outputs[0].loss.detach()) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("bank_init", ["encoder", "random"])
def test_nce_z_is_estimated_against_the_papers_random_start(cfg_factory, monkeypatch, bank_init):
    # nce_z=random_start (the default): Z as the paper's first batch sees it, the bank holding random unit vectors,
    # whatever bank_init is; an encoder-filled bank would give a far larger Z
    torch.manual_seed(0)
    cfg = cfg_factory(
        *BANK,
        *SMALL,
        "method.loss=nce",
        "method.temperature=0.1",
        "method.proj_out_dim=128",
        f"method.bank_init={bank_init}",
    )
    assert cfg.method.nce_z == "random_start"
    model, dm = build(cfg)
    embeds = spy(monkeypatch, model, "embed")
    draws = spy(monkeypatch, model.negatives.bank, "sample_indices")

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.bank0, self.index0 = pl_module.negatives.bank.features.clone(), batch[2].clone()

    record = Record()
    fit(model, dm, [record], max_epochs=1, max_steps=1, limit_val_batches=0)
    t, n, k = 0.1, model.num_train, draws[0].shape[1]
    q = F.normalize(embeds[0][1].detach(), dim=1)
    if bank_init == "random":  # the bank is the paper's start: its own K + 1 entries
        sampled = torch.cat(
            [
                (q * record.bank0[record.index0]).sum(1, keepdim=True),
                torch.einsum("nd,nkd->nk", q, record.bank0[draws[0]]),
            ],
            1,
        )
    else:  # K + 1 random unit vectors drawn from the run's seed
        gen = torch.Generator().manual_seed(model.cfg.seed)
        sampled = q @ F.normalize(torch.randn(k + 1, q.shape[1], generator=gen), dim=1).T
    log_z = float(torch.log(torch.exp(sampled.double() / t).mean() * n))
    assert float(model.negatives.log_z) == pytest.approx(log_z, rel=1e-5, abs=1e-5)
    # for random unit vectors in D dimensions, E[exp(v . f / T)] ~ exp(1 / (2 D T^2)): Z / n ~ 1.5 at D 128, T 0.1
    # (loosely: 76 vectors make a noisy mean of a heavy-tailed exponential)
    d = q.shape[1]
    assert float(model.negatives.log_z) - math.log(n) == pytest.approx(1 / (2 * d * t * t), abs=0.2)
    if bank_init == "encoder":  # what the bank as it stands would have given: far from the paper's regime
        own = torch.cat(
            [
                (q * record.bank0[record.index0]).sum(1, keepdim=True),
                torch.einsum("nd,nkd->nk", q, record.bank0[draws[0]]),
            ],
            1,
        )
        assert float(torch.log(torch.exp(own.double() / t).mean())) > float(model.negatives.log_z) - math.log(n) + 1


# -- sampling ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 3, 7, 64, 1000])
def test_sampled_negatives_in_range_and_never_the_query_itself(size):
    bank = MemoryBank(size, 2)
    gen = torch.Generator().manual_seed(size)
    for draw in range(40):
        k = [1, size - 1, 2 * size + 3][draw % 3]
        own = torch.randint(size, (16,), generator=gen)
        own[:2] = torch.tensor([0, size - 1])  # the edges, and repeated samples, must hold too
        own[2] = own[3]
        torch.manual_seed(1000 * size + draw)
        idx = bank.sample_indices(own, k)
        assert idx.shape == (16, k) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < size
        assert not (idx == own[:, None]).any()
    if size == 2:  # the only other entry
        assert torch.equal(bank.sample_indices(torch.tensor([0, 1]), 5), torch.tensor([[1] * 5, [0] * 5]))


def test_sampled_negatives_uniform_over_the_other_entries():
    bank = MemoryBank(10, 2)
    torch.manual_seed(0)
    idx = bank.sample_indices(torch.full((200,), 4), 100)
    counts = torch.bincount(idx.flatten(), minlength=10)
    assert counts[4] == 0
    others = counts[torch.arange(10) != 4].float()
    expected = 20000 / 9  # std ~ 44
    assert ((others - expected).abs() < 200).all(), counts


# -- config ----------------------------------------------------------------------------------------------------
def test_num_negatives_not_below_training_set_is_rejected_before_training(tmp_path):
    probe = make_cfg([*BANK], tmp_path=tmp_path)
    num_train = ContrastiveDataModule(probe.data).num_train
    validate_with_data(make_cfg([*BANK, f"method.num_negatives={num_train - 1}"]), num_train)
    for k in (num_train, num_train + 50):
        with pytest.raises(ConfigError, match="method.num_negatives") as err:
            train(make_cfg([*BANK, f"method.num_negatives={k}"], tmp_path=tmp_path / str(k)))
        assert str(num_train) in str(err.value)
        assert not (tmp_path / str(k) / "checkpoints").exists() and not (tmp_path / str(k) / "metrics.json").exists()


# -- staleness ---------------------------------------------------------------------------------------------------
def test_staleness_is_cosine_to_fresh_key_and_age_of_probe_entries(cfg_factory):
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*BANK, *SMALL, "method.probe_size=32"))
    trainer = fit(model, dm, max_epochs=2)
    logged = trainer.callback_metrics

    # the state after fit is the state of the last validation: recompute both figures by hand
    slots = model._probe_index
    assert len(slots) == 32
    model.eval()
    with torch.no_grad():
        images = torch.stack([dm.train_set[int(i)][0] for i in slots])
        fresh = model.projector(model.backbone(model.eval_transform(images)))
    written = model.negatives.bank.written_at[slots]
    seen = written >= 0
    assert seen.sum() > 16
    cos = F.cosine_similarity(model.negatives.bank.features[slots][seen], fresh[seen], dim=1).mean()
    age = (trainer.global_step - written[seen]).float().mean()
    assert 0 < float(cos) <= 1
    assert float(logged["diag/staleness"]) == pytest.approx(float(cos), abs=1e-5)
    assert float(logged["diag/staleness_age_steps"]) == pytest.approx(float(age), abs=1e-5)


def logged_per_epoch(out: Path, key: str) -> dict[int, float]:
    with open(out / "logs" / "metrics.csv") as f:
        return {int(r["epoch"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


# -- whole runs: checkpoint, resume, metrics.json ----------------------------------------------------------------
RUN = [*BANK, "data.size=128", "eval.init=false", "eval.pixels=false", "eval.final=false"]  # 3 steps per epoch


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bank_run")
    return out, train(make_cfg(RUN, tmp_path=out))


def test_run_history_has_each_epochs_staleness(bank_run):
    out, _ = bank_run
    saved = json.loads((out / "metrics.json").read_text())
    history = saved["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    for key in ("staleness", "staleness_age_steps"):
        logged = logged_per_epoch(out, f"diag/{key}")
        assert sorted(logged) == [0, 1]
        # each epoch's record holds the figure measured at that epoch's validation, not the one before
        assert [r.get(key) for r in history] == [round(logged[e], 5) for e in (0, 1)], key
        assert saved[key] == history[-1][key]
    for record in history:
        assert 0 < record["staleness"] <= 1 and 0 < record["staleness_age_steps"] <= record["step"], record


def test_checkpoint_holds_bank_and_resume_starts_from_it(bank_run, tmp_path, monkeypatch):
    out, summary = bank_run
    ckpt_path = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    features, written = state["negatives.bank.features"], state["negatives.bank.written_at"]
    steps = summary["global_steps"]
    assert steps == 6
    assert features.shape == (ContrastiveDataModule(make_cfg(RUN).data).num_train, 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(features)))
    assert int(written.max()) == steps - 1 and (written >= 0).float().mean() > 0.5

    loaded = MemoryBankMethod.load_from_checkpoint(ckpt_path, map_location="cpu")
    assert torch.equal(loaded.negatives.bank.features, features) and torch.equal(
        loaded.negatives.bank.written_at, written
    )

    first: dict[str, Any] = {}
    update = MemoryBank.update

    def recording_update(self, index, feats, step):
        if not first:
            first.update(features=self.features.clone(), written=self.written_at.clone(), step=step)
        update(self, index, feats, step)

    monkeypatch.setattr(MemoryBank, "update", recording_update)
    resumed = train(make_cfg([*RUN, f"ckpt_path={ckpt_path}", "trainer.max_epochs=3"], tmp_path=tmp_path))
    assert first["step"] == steps
    assert torch.equal(first["features"], features) and torch.equal(first["written"], written)
    assert resumed["epochs"] == 3 and resumed["global_steps"] == steps + 3
