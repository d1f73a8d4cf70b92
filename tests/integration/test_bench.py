"""The benchmark (``python benchmarks/bench.py``): its measurement logic, a tiny end-to-end run, and the
performance fixes it checks (no host-device sync in the methods' steps, the memory bank's dense cosines)."""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contrastive.methods import build_method
from contrastive.negatives import bank as bank_source
from contrastive.negatives.base import Step

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench.py"  # outside the installed package: imported from its folder


def run_bench(args: list[str], out: Path, timeout: int, one_thread: bool = True) -> tuple[dict, str]:
    """benchmarks/bench.py in a subprocess with ``--out out``: its JSON report and what it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


sys.path.insert(0, str(BENCH.parent))
bench = importlib.import_module("bench")


# -- measurement logic ------------------------------------------------------------------------------------------
class FakeChannel:
    """Hands out the coordinator's commands in order and records when each was asked for and what was sent."""

    def __init__(self, commands: list[str], clock: list[float]) -> None:
        self.commands, self.clock = list(commands), clock
        self.asked_at: list[float] = []
        self.sent: list[dict] = []

    def recv(self) -> str:
        self.asked_at.append(self.clock[0])
        return self.commands.pop(0)

    def send(self, message: dict) -> None:
        self.sent.append(message)


@pytest.mark.parametrize(("kind", "name"), [("framework", "moco"), ("framework", "simclr"), ("lightly", "lightly")])
def test_schedule_times_exactly_the_timed_steps_of_each_chunk(monkeypatch, kind, name):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    s = bench.Settings(steps=2, rounds=3, warmup=3, loader_workers=1, lightly="python", budget=40, contenders=3)
    settle, chunks = s.settle(kind), s.chunks(name)
    assert settle == (2 if kind == "lightly" else 0)  # one loader worker, prefetch factor 2
    assert chunks == (6 if name == "simclr" else 3)  # the reference runs next to each of the 2 others per round
    plan = [
        ("simclr", "framework", "simclr", ()),
        ("moco", "framework", "moco", ()),
        ("lightly", "lightly", "simclr", ()),
    ]
    total = bench.training_steps(s, plan)[name]
    assert total == (40 if name in ("simclr", "lightly") else s.timed_end(kind, name))  # kNN budget or timing only
    channel = FakeChannel(["go"] * chunks + ["finish"], clock)
    schedule = bench.Schedule(s, kind, name, channel, sync=lambda: None, audit=False)
    fetch_s, step_s = 0.25, lambda step: 1.0 + step  # every step a different length: the window must be exact
    waits_at_step = []
    for step in range(total):
        asked = len(channel.asked_at)
        schedule.before_fetch(step)
        if len(channel.asked_at) > asked:
            waits_at_step.append(step)
        clock[0] += fetch_s
        schedule.fetched(step)
        clock[0] += step_s(step)
        schedule.step_end(step)
    schedule.wait_finish()

    starts = [s.warmup + r * (settle + s.steps) for r in range(chunks)]
    end = s.timed_end(kind, name)
    # go before each chunk, then finish before the rest of the budget (after the loop when there is none)
    assert waits_at_step == [0, *starts[1:], *([end] if end < total else [])]
    assert not channel.commands
    assert [m["event"] for m in channel.sent] == ["ready"] + ["round"] * chunks
    for r, start in enumerate(starts):
        timed = range(start + settle, start + settle + s.steps)
        expected = sum(fetch_s + step_s(t) for t in timed) / s.steps
        assert schedule.rounds[r]["step_s"] == pytest.approx(expected)
        assert schedule.rounds[r]["data_s"] == pytest.approx(fetch_s)


def test_the_compared_contenders_train_the_same_budget_covering_every_schedule():
    s = bench.Settings(steps=3, rounds=2, warmup=3, loader_workers=2, lightly="python", contenders=3)
    plan = [
        ("simclr", "framework", "simclr", ()),
        ("moco", "framework", "moco", ()),
        ("lightly", "lightly", "simclr", ()),
    ]
    # simclr: 3 + 2 * 2 chunks * 3 = 15 steps; lightly: 3 + 2 * (4 settle + 3) = 17; moco: 3 + 2 * 3 = 9
    assert bench.training_steps(s, plan) == {"simclr": 17, "moco": 9, "lightly": 17}
    s.budget = 50
    assert bench.training_steps(s, plan) == {"simclr": 50, "moco": 9, "lightly": 50}
    s.knn = False
    assert bench.training_steps(s, plan) == {"simclr": 15, "moco": 9, "lightly": 17}


def test_paired_ratio_is_the_median_of_per_round_ratios():
    result = {"rounds": [{"step_s": 2.0}, {"step_s": 4.0}, {"step_s": 9.0}], "reference_step_s": [1.0, 1.0, 3.0]}
    # per round 2, 4, 3: the median 3 (the ratio of medians, 4 / 1, would be wrong)
    assert bench.paired_ratio(result) == 3.0


def test_sync_audit_flags_scalar_reads_and_mask_indexing_only():
    x = torch.arange(6.0)
    with bench.make_sync_audit() as audit:
        y = (x * 2 + 1).softmax(0)
        x.sum().item()
        float(x[0])
        x[x > 2]
        torch.nonzero(x)
        y[torch.tensor([0, 2])]  # integer indices: no sync
    ops = [hit.split(" at ")[0] for hit in audit.hits]
    assert ops == ["aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::index", "aten::nonzero"]
    assert all(re.search(r"at test_bench\.py:\d+$", hit) for hit in audit.hits), audit.hits


# where a method's step runs: none of it may read a device value back to the host
OWN_STEP_CODE = ("contrastive/methods/", "contrastive/negatives/", "contrastive/models/key_encoder", "lightning/")


# -- the whole benchmark, tiny --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    report, stdout = run_bench(["--tiny", "--lightly", "none"], out, timeout=600)
    assert "framework_vs_bare" in stdout  # the table is printed too
    return report


def test_tiny_run_reports_every_contender_consistently(tiny_report):
    s, results = tiny_report["settings"], tiny_report["results"]
    assert list(results) == [*bench.registered_methods(), "swav_2crop", "bare"]
    for r in results.values():
        assert r["step_s"] == pytest.approx(statistics.median(x["step_s"] for x in r["rounds"]), abs=1e-5)
        assert r["step_s"] > 0 and r["images_per_sec"] == pytest.approx(s["batch"] / r["step_s"], rel=1e-3)
        assert 0 <= r["data_vs_step"] < 1 and r["peak_mem_mb"] > 0
        assert r["cpu_s"] > 0 and r["cores_busy"] == pytest.approx(r["cpu_s"] / r["step_s"], abs=0.01)
    reference_chunks = len(results["simclr"]["rounds"])
    assert reference_chunks == s["rounds"] * (len(results) - 1) == s["reference_chunks"]
    for name, r in results.items():
        if name != "simclr":
            assert len(r["rounds"]) == len(r["reference_step_s"]) == s["rounds"]
            # each paired reference chunk is one of the reference's own chunks
            assert set(r["reference_step_s"]) <= {x["step_s"] for x in results["simclr"]["rounds"]}
    ratio = tiny_report["ratios"]["framework_vs_bare"]
    assert ratio["value"] == pytest.approx(1 / bench.paired_ratio(results["bare"]), abs=1e-3)
    assert ratio["met"] == (ratio["value"] <= 1.05)
    for method in ("memory_bank", "moco", "swav", "swav_2crop"):
        assert tiny_report["ratios"][f"{method}_vs_simclr"]["target"] == "<= 1.1"
    for name in ("simclr", "bare"):
        assert 0 <= results[name]["knn_acc"] <= 100
    assert 0 <= results["simclr"]["init_knn_acc"] <= 100
    assert tiny_report["machine"]["cores"] == os.cpu_count() and tiny_report["date"]


def test_tiny_run_reports_flops_and_utilisation(tiny_report):
    """Every contender's FLOPs per image, achieved FLOP/s and utilisation against the measured peak."""
    peak = tiny_report["peak"]
    assert peak["dtype"] == "float32" and peak["flops"]["float32"] > 0 and peak["threads"] == 1
    results = tiny_report["results"]
    for name, r in results.items():
        assert r["step_images"] == tiny_report["settings"]["batch"], name
        assert r["flops_per_image"] == pytest.approx(r["step_flops"] / r["step_images"], abs=1), name
        assert sum(r["step_flops_parts"].values()) == r["step_flops"], name
        assert r["achieved_flops"] == pytest.approx(r["flops_per_image"] * r["images_per_sec"], rel=1e-3), name
        assert r["peak_flops"] == peak["flops"]["float32"]
        assert 0 < r["utilisation"] < 1, name
        assert r["utilisation"] == pytest.approx(r["achieved_flops"] / r["peak_flops"], abs=1e-4), name
    # the same SimCLR work through the framework and the bare loop (plus the framework's online probe)
    assert results["simclr"]["flops_per_image"] == pytest.approx(results["bare"]["flops_per_image"], rel=0.05)
    # SwAV's two small crops add work; the memory bank trains one view, not two
    assert results["swav"]["flops_per_image"] > results["swav_2crop"]["flops_per_image"]
    assert results["memory_bank"]["flops_per_image"] < results["simclr"]["flops_per_image"]


def test_no_method_step_makes_the_host_wait_for_the_device(tiny_report):
    """The audited step of every method: nothing in the methods or Lightning's per-step logging reads a device
    value back (the remaining sites, if any, are in shared loss and metric functions)."""
    for method in bench.registered_methods():
        sites = tiny_report["results"][method]["sync_sites"]
        assert not [site for site in sites if any(part in site for part in OWN_STEP_CODE)], (method, sites)


# -- the memory bank's two ways to its cosines ----------------------------------------------------------------
@pytest.mark.parametrize("dense", [True, False])
def test_bank_cosines_and_their_gradient_match_a_loop(cfg_factory, monkeypatch, dense):
    monkeypatch.setattr(bank_source, "DENSE_BANK_RATIO", 32 if dense else 0)
    model = build_method(cfg_factory("method=memory_bank", "method.num_negatives=7"), 40)
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, model.negatives.bank.features.shape[1], generator=gen), dim=1).requires_grad_()
    neg_index = torch.randint(40, (5, 7), generator=gen)
    bank = model.negatives.bank_for_cosines(7)
    assert (bank is not None) == dense
    cos = model.negatives.bank_cosines(q, bank, neg_index)
    expected = torch.stack(
        [torch.stack([q[i] @ model.negatives.bank.features[j] for j in row]) for i, row in enumerate(neg_index)]
    )
    torch.testing.assert_close(cos, expected)
    weights = torch.randn(5, 7, generator=gen)
    (grad,) = torch.autograd.grad((cos * weights).sum(), q)
    torch.testing.assert_close(grad, torch.einsum("nk,nkd->nd", weights, model.negatives.bank.features[neg_index]))


@pytest.mark.parametrize("dense", [True, False])
def test_bank_loss_backward_survives_the_in_place_bank_update(cfg_factory, monkeypatch, dense):
    monkeypatch.setattr(bank_source, "DENSE_BANK_RATIO", 32 if dense else 0)
    model = build_method(cfg_factory("method=memory_bank", "method.num_negatives=7"), 40)
    q = torch.randn(6, model.negatives.bank.features.shape[1], requires_grad=True)
    index = torch.arange(6)
    before = model.negatives.bank.features.clone()
    loss, _ = model.negatives.loss({0: q}, {0: q}, Step(index, torch.zeros(6, dtype=torch.long), global_step=0, seed=0))
    assert not torch.equal(model.negatives.bank.features[index], before[index])  # the update ran inside the step
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.slow
@pytest.mark.skipif(bench.lightly_available(bench.LIGHTLY_PYTHON) is None, reason="no Python with lightly")
def test_tiny_run_side_by_side_with_lightly(tmp_path):
    out = tmp_path / "report.json"
    report, _ = run_bench(["--tiny", "--methods", "simclr"], out, timeout=900)
    lightly = report["results"]["lightly"]
    assert report["machine"]["lightly"] == lightly["lightly_version"]
    assert 0 <= lightly["knn_acc"] <= 100 and len(lightly["rounds"]) == report["settings"]["rounds"]
    assert report["ratios"]["simclr_vs_lightly"]["value"] == pytest.approx(bench.paired_ratio(lightly), abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tiny_run_on_the_gpu(tmp_path):
    out = tmp_path / "report.json"
    report, _ = run_bench(["--device", "cuda", "--tiny", "--lightly", "none"], out, timeout=900, one_thread=False)
    assert {"cpu_aug", "bare", "simclr"} <= set(report["results"])
    assert report["results"]["simclr"]["epoch_s"] > 0 and "simclr_vs_cpu_aug" in report["ratios"]
    for method in bench.registered_methods():
        sites = report["results"][method]["sync_sites"]
        assert not [site for site in sites if any(part in site for part in OWN_STEP_CODE)], (method, sites)


# -- make bench-gpu: its report section and its CPU dry run ------------------------------------------------------
def test_markdown_section_replaces_the_earlier_run_of_its_device_only(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    first, second = (
        f"{bench.SECTION_BEGIN.format(device='cuda')}\n## GPU run {i}\n{bench.SECTION_END.format(device='cuda')}\n"
        for i in (1, 2)
    )
    cpu = f"{bench.SECTION_BEGIN.format(device='cpu')}\n## CPU run\n{bench.SECTION_END.format(device='cpu')}\n"
    bench.write_markdown_section(path, first, "cuda")
    bench.write_markdown_section(path, cpu, "cpu")
    path.write_text(path.read_text() + "\n## Later text\n")
    bench.write_markdown_section(path, second, "cuda")
    text = path.read_text()
    assert text == f"# Benchmarks\n\nintro\n\n{second}\n{cpu}\n## Later text\n"


def test_bench_gpu_without_a_gpu_says_so_before_starting_anything(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run", lambda s: pytest.fail("workers started"))
    with pytest.raises(SystemExit, match="no CUDA device .* --device cpu --tiny --gpu-recipe"):
        bench.main(bench_gpu_recipe())


def bench_gpu_recipe() -> list[str]:
    """The arguments of `make bench-gpu`'s command, read from the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("bench-gpu:") + 1].split()
    assert recipe[:2] == ["$(PYTHON)", "benchmarks/bench.py"]
    return recipe[2:]


@pytest.mark.slow
def test_bench_gpu_dry_run_on_the_cpu(tmp_path):
    """`make bench-gpu`'s command with --device cpu, tiny sizes and the GPU recipe: everything it measures is
    there, and its section lands in (a copy of) BENCHMARKS.md."""
    args = bench_gpu_recipe()
    assert args[args.index("--device") + 1] == "cuda" and args[args.index("--markdown") + 1] == "BENCHMARKS.md"
    args[args.index("--device") + 1] = "cpu"
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text((ROOT / "BENCHMARKS.md").read_text())
    args[args.index("--markdown") + 1] = str(markdown)
    out = tmp_path / "report.json"
    report, _ = run_bench([*args, "--tiny", "--gpu-recipe"], out, timeout=1200)
    s, results, ratios = report["settings"], report["results"], report["ratios"]
    assert s["precision"] == "bf16-mixed" and s["channels_last"] and s["epoch"] and s["epoch_compile"]
    assert s["on_device"]
    assert list(results) == [*bench.registered_methods(), "swav_2crop", "bare", "cpu_aug"]
    simclr = results["simclr"]
    for prefix in ("", "compiled_"):
        assert simclr[f"{prefix}epoch_s"] > 0 and simclr[f"{prefix}epoch_peak_mem_mb"] > 0
        # the whole training split in full batches
        assert simclr[f"{prefix}epoch_images"] == s["train_images"] // s["batch"] * s["batch"]
        assert ratios[f"simclr_{prefix}epoch_s"]["value"] == pytest.approx(simclr[f"{prefix}epoch_s"], abs=1e-3)
    assert ratios["simclr_vs_cpu_aug"]["value"] == pytest.approx(bench.paired_ratio(results["cpu_aug"]), abs=1e-3)
    for method in ("memory_bank", "moco", "swav"):
        assert ratios[f"{method}_vs_simclr"]["value"] > 0
    text = markdown.read_text()
    assert text.startswith((ROOT / "BENCHMARKS.md").read_text().split(bench.SECTION_BEGIN.format(device="cpu"))[0])
    section = text.split(bench.SECTION_BEGIN.format(device="cpu"))[1].split(bench.SECTION_END.format(device="cpu"))[0]
    assert text.count(bench.SECTION_BEGIN.format(device="cpu")) == 1
    assert f"| {s['precision']}, eager | {simclr['epoch_s']:.3f} |" in section
    assert f"| cpu_aug | {results['cpu_aug']['images_per_sec']:.1f} |" in section
