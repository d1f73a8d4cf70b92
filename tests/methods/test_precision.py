"""bf16 mixed precision, channels_last and torch.compile on the CPU, for every method.

Two kinds of check. One step of each method's loss on fixed views, compared with the same step in float32 (same
seed, same batch, same initial weights), within the tolerances stated below. And a few real training steps through
``train(cfg)`` with the setting on, checking that it is in effect (a bf16 activation, a channels_last input, a
compiled backbone) and that every logged loss is finite. The compile checks build with inductor (gcc) and take
minutes: they are in the slow suite.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build, make_cfg
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

from contrastive.train import train

METHODS = {
    "simclr": ["method=simclr"],
    "memory_bank": ["method=memory_bank"],
    "moco": ["method=moco", "method.queue_size=64"],
    "swav": ["method=swav", "method.num_prototypes=10"],
}
# RGB: with one channel a channels_last tensor is also contiguous, and the format could not be told apart
TINY = [
    "data.size=128",
    "data.batch_size=16",
    "data.channels=3",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.22,0.22,0.22]",
]

# Stated tolerances against the float32 step.
# bf16 keeps 8 significant bits (a relative rounding step of 2**-8 = 0.4 %) in every convolution and product;
# the logits are cosines divided by a temperature (and SwAV's codes by epsilon = 0.05), which magnifies it. Measured
# on these tiny models: loss within 1.1 % (SwAV; 0.1 to 0.5 % for the others), gradient cosine >= 0.986.
BF16_LOSS_RTOL = 0.03
BF16_GRAD_COSINE = 0.95
# channels_last and compile do the same float32 arithmetic, in another memory order or fused: rounding only.
FP32_LOSS_RTOL = 1e-4
FP32_GRAD_RTOL = 1e-3  # relative norm of the gradient difference


def one_step(method: str, variant: str) -> dict[str, object]:
    """One ``contrastive_loss`` + backward of ``method`` on a fixed batch of views, in ``variant``: ``fp32``,
    ``bf16`` (Lightning's bf16-mixed autocast context, the one its Trainer wraps each step in), ``channels_last`` (the
    model and views converted as ``train`` and ``training_step`` do) or ``compile`` (the backbone compiled as
    ``train`` does)."""
    cfg = make_cfg([*METHODS[method], *TINY, f"perf.channels_last={variant == 'channels_last'}"])
    torch.manual_seed(0)
    model, dm = build(cfg)
    model.train()
    images, labels, index = next(iter(dm.train_dataloader()))
    torch.manual_seed(1)
    with torch.no_grad():
        views = model.augment(images)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    if variant == "compile":
        model.backbone.compile()
    context = MixedPrecision("bf16-mixed", "cpu").forward_context() if variant == "bf16" else contextlib.nullcontext()
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    torch.manual_seed(2)  # MoCo's shuffle and the bank's draws: alike in every variant
    with context:
        out = model.contrastive_loss(views, model.step_context(index, labels))
    out.loss.backward()
    hook.remove()
    grads = [p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None]
    return {
        "loss": out.loss.detach().float(),
        "grad": torch.cat(grads).float(),
        "dtypes": dtypes,
        "weight_channels_last": first_conv.weight.is_contiguous(memory_format=torch.channels_last),
    }


@pytest.fixture(scope="module")
def fp32_steps() -> dict[str, dict[str, object]]:
    return {method: one_step(method, "fp32") for method in METHODS}


def compare(got: dict, want: dict, loss_rtol: float) -> tuple[float, float]:
    """(relative loss difference, gradient cosine) after checking both are finite and the step is not vacuous."""
    assert torch.isfinite(got["loss"]) and torch.isfinite(got["grad"]).all()
    assert want["grad"].abs().max() > 1e-4  # a step without gradient would match anything
    rel = float((got["loss"] - want["loss"]).abs() / want["loss"].abs())
    assert rel <= loss_rtol, (float(got["loss"]), float(want["loss"]))
    return rel, float(F.cosine_similarity(got["grad"], want["grad"], dim=0))


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_step_matches_float32_within_tolerance(fp32_steps, method):
    got = one_step(method, "bf16")
    assert set(got["dtypes"]) == {torch.bfloat16}  # the convolutions did run in bf16
    assert fp32_steps[method]["dtypes"] and set(fp32_steps[method]["dtypes"]) == {torch.float32}
    rel, cosine = compare(got, fp32_steps[method], BF16_LOSS_RTOL)
    assert rel > 0  # bf16 rounding shows: the comparison is not float32 against itself
    assert cosine >= BF16_GRAD_COSINE


@pytest.mark.parametrize("method", list(METHODS))
def test_channels_last_step_matches_float32(fp32_steps, method):
    got = one_step(method, "channels_last")
    assert got["weight_channels_last"] and not fp32_steps[method]["weight_channels_last"]
    compare(got, fp32_steps[method], FP32_LOSS_RTOL)
    diff = (got["grad"] - fp32_steps[method]["grad"]).norm() / fp32_steps[method]["grad"].norm()
    assert diff <= FP32_GRAD_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_step_matches_float32(fp32_steps, method):
    got = one_step(method, "compile")
    compare(got, fp32_steps[method], FP32_LOSS_RTOL)
    diff = (got["grad"] - fp32_steps[method]["grad"]).norm() / fp32_steps[method]["grad"].norm()
    assert diff <= FP32_GRAD_RTOL


# -- a few real training steps through train(cfg) ----------------------------------------------------------------
RUN = [
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "eval.final=false",
    "eval.init=false",
    "eval.pixels=false",
]


def train_few_steps(tmp_path, monkeypatch, method: str, *overrides: str) -> dict[str, object]:
    """``train`` 3 steps; records the dtype and memory format of what the backbone's first convolution sees and
    gives during training, and keeps the model ``fit`` trained."""
    import contrastive.methods as methods_module  # train() looks build_method up there at each call

    cfg = make_cfg([*METHODS[method], *RUN, *overrides], tmp_path=tmp_path)
    seen: list[tuple[torch.dtype, bool]] = []
    models = []
    build_method = methods_module.build_method

    def spying_build(*args, **kwargs):
        model = build_method(*args, **kwargs)
        conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(module, inputs, output):
            if module.training:
                seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

        conv.register_forward_hook(hook)
        models.append(model)
        return model

    monkeypatch.setattr(methods_module, "build_method", spying_build)
    metrics = train(cfg)
    losses = [
        float(line.split(",")[i]) for line, i in _csv_column(tmp_path / "logs" / "metrics.csv", "train/loss_step")
    ]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert metrics["global_steps"] == 3 and math.isfinite(metrics["final_loss"])
    return {"metrics": metrics, "seen": seen, "losses": losses, "model": models[0]}


def _csv_column(path, name: str) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [(line, column) for line in lines[1:] if line.split(",")[column]]


@pytest.mark.parametrize("method", list(METHODS))
def test_trains_in_bf16_mixed_with_channels_last(tmp_path, monkeypatch, method):
    run = train_few_steps(tmp_path, monkeypatch, method, "trainer.precision=bf16-mixed", "perf.channels_last=true")
    assert run["seen"] and all(dtype == torch.bfloat16 and channels_last for dtype, channels_last in run["seen"])
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.trainer.precision == "bf16-mixed" and saved.perf.channels_last


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_trains_compiled(tmp_path, monkeypatch, method):
    run = train_few_steps(tmp_path, monkeypatch, method, "perf.compile=true", "trainer.precision=bf16-mixed")
    assert run["model"].backbone._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # inductor did build graphs
    # compiled in place: the checkpoint keeps the plain parameter names, so it resumes and exports without compile
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    plain, _ = build(make_cfg([*METHODS[method], *TINY]))
    assert set(state) == set(plain.state_dict())
