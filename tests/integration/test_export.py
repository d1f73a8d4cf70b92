"""Exported backbones: plain state_dicts that load strictly into the documented constructors and compute what the
trained backbone computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO, build, make_cfg

import contrastive.models
from contrastive.export import ExportError, export_backbone, load_backbone, main
from contrastive.train import train


def documented_constructor(spec: dict) -> torch.nn.Module:
    """Run the constructor the export's JSON states, as a user would paste it."""
    scope = {"torch": torch, "torchvision": torchvision, "contrastive": contrastive}
    if spec["constructor"].startswith("contrastive.models."):
        return eval(spec["constructor"], scope)
    exec(spec["constructor"], scope)
    return scope["net"]


def checkpoint_of(tmp_path: Path, *overrides: str) -> tuple[Path, torch.nn.Module, int]:
    """A checkpoint of an untrained model whose weights and BN statistics are randomised (no default values
    that a wrong mapping could match by chance)."""
    cfg = make_cfg(list(overrides), tmp_path=tmp_path)
    model, dm = build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.backbone.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + (0.5 if "running_var" in name else -0.25))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path, model.backbone.eval(), cfg.data.channels


@pytest.mark.parametrize(
    "overrides",
    [
        ("backbone=small_cnn", "backbone.pool_size=2", "backbone.fc_dim=24"),
        ("backbone=resnet18",),  # 32-pixel stem
        ("backbone=resnet18", "backbone.small_images=false"),  # torchvision's stem, 1-channel conv1
        (
            "backbone=resnet50",
            "backbone.small_images=false",
            "data.channels=3",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]",
        ),  # torchvision's own ResNet-50, as is
    ],
    ids=["small_cnn", "resnet18_small_stem", "resnet18_1ch", "resnet50"],
)
def test_exported_backbone_loads_strictly_and_computes_the_same(tmp_path, overrides):
    ckpt, backbone, channels = checkpoint_of(tmp_path, *overrides)
    out = export_backbone(ckpt, tmp_path / "export" / "backbone.pt")
    weights = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    spec = json.loads(out.with_name("backbone.pt.json").read_text())
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        expected = backbone(x)
        for net in (documented_constructor(spec), load_backbone(out)):
            net.load_state_dict(weights, strict=True)
            torch.testing.assert_close(net.eval()(x), expected)
    if "resnet50" in overrides[0]:  # no stem change: the unmodified torchvision model, less its classifier
        net = torchvision.models.resnet50(weights=None)
        net.fc = torch.nn.Identity()
        net.load_state_dict(weights, strict=True)


def test_export_from_the_cli_after_a_real_run(tmp_path):
    """Train MoCo for an epoch, export both encoders from the command line, load them from Python."""
    train(
        make_cfg(
            ["method=moco", "method.queue_size=128", "trainer.max_epochs=1", "eval.init=false", "eval.pixels=false"],
            tmp_path=tmp_path,
        )
    )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for encoder, prefix in (("query", "backbone."), ("key", "key_encoder.backbone.")):
        out = tmp_path / f"{encoder}.pt"
        done = subprocess.run(
            [sys.executable, "-m", "contrastive.export", f"ckpt={ckpt}", f"out={out}", f"encoder={encoder}"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert str(out) in done.stdout
        net = load_backbone(out)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(value, state[prefix + key], rtol=0, atol=0)
    # the two encoders differ after training (momentum < 1), so each export holds its own weights
    assert not torch.equal(
        torch.load(tmp_path / "query.pt")["net.0.weight"], torch.load(tmp_path / "key.pt")["net.0.weight"]
    )


def test_export_errors_name_the_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_backbone(tmp_path / "missing.ckpt")
    ckpt, _, _ = checkpoint_of(tmp_path)  # SimCLR: no momentum encoder
    with pytest.raises(ExportError, match="no key encoder"):
        export_backbone(ckpt, encoder="key")
    with pytest.raises(ExportError, match="encoder='value'"):
        export_backbone(ckpt, encoder="value")
    out = export_backbone(ckpt, tmp_path / "b.pt")
    out.with_name("b.pt.json").unlink()
    with pytest.raises(ExportError, match=r"b\.pt\.json is missing"):
        load_backbone(out)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        export_backbone(junk)
    done = subprocess.run(
        [sys.executable, "-m", "contrastive.export", f"ckpt={tmp_path / 'missing.ckpt'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2 and "missing.ckpt" in done.stderr


def test_damaged_files_are_refused_by_the_one_checkpoint_reader(tmp_path, capsys):
    """A training checkpoint and an exported backbone are both read by contrastive.checkpoints.read_checkpoint:
    damage is an ExportError naming the file (exit code 2), never a traceback."""
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert main([f"ckpt={junk}"]) == 2
    assert f"error: ckpt='{junk}' is not a contrastive checkpoint" in capsys.readouterr().err
    ckpt, _, _ = checkpoint_of(tmp_path)
    out = export_backbone(ckpt, tmp_path / "b.pt")
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ExportError, match=r"b\.pt cannot be read as a checkpoint .*truncated"):
        load_backbone(out)


def test_export_never_overwrites_its_checkpoint_or_an_existing_file(tmp_path, capsys):
    """out=ckpt (also through a symbolic link) is refused, an existing out is kept unless overwrite=true, and an
    out that is a folder gets a message, not a traceback; each is exit 2 with the checkpoint as it was."""
    ckpt, _, _ = checkpoint_of(tmp_path)
    before = ckpt.read_bytes()
    link = tmp_path / "link.ckpt"
    link.symlink_to(ckpt)
    for out in (ckpt, link, tmp_path / "." / ckpt.name):
        assert main([f"ckpt={ckpt}", f"out={out}"]) == 2
        assert "would overwrite the checkpoint" in capsys.readouterr().err
        assert main([f"ckpt={ckpt}", f"out={out}", "overwrite=true"]) == 2
    assert ckpt.read_bytes() == before
    (tmp_path / "folder").mkdir()
    assert main([f"ckpt={ckpt}", f"out={tmp_path / 'folder'}"]) == 2
    assert "is a folder: give a file name" in capsys.readouterr().err
    out = tmp_path / "b.pt"
    out.write_bytes(b"someone's file")
    assert main([f"ckpt={ckpt}", f"out={out}"]) == 2
    assert f"{out} already exists" in capsys.readouterr().err and out.read_bytes() == b"someone's file"
    assert main([f"ckpt={ckpt}", f"out={out}", "overwrite=true"]) == 0
    assert set(load_backbone(out).state_dict()) == set(torch.load(out, weights_only=True))
    assert main([f"ckpt={ckpt}", f"out={out}", "overwrite=maybe"]) == 2
    capsys.readouterr()
    assert main([f"ckpt={ckpt}", f"out={out / 'inside' / 'b.pt'}"]) == 2  # a path through a file
    assert "cannot write out=" in capsys.readouterr().err


def _edited(**changes):
    """The exported spec with top-level keys (``in_channels``) or backbone keys (``backbone_width``) changed."""

    def edit(spec: dict) -> str:
        for key, value in changes.items():
            where, key = (spec["backbone"], key[len("backbone_") :]) if key.startswith("backbone_") else (spec, key)
            if value is None:
                del where[key]
            else:
                where[key] = value
        return json.dumps(spec)

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda spec: "{not json", "is not valid JSON"),
        (lambda spec: "", "is not valid JSON"),
        (lambda spec: "[1, 2]", "holds a JSON list"),
        (_edited(backbone=None), "has no 'backbone' key"),
        (_edited(in_channels="one"), "'in_channels' is 'one', expected a JSON integer"),
        (_edited(backbone_width="8"), "'backbone.width' is '8', expected a JSON integer"),
        (_edited(backbone_name=3), "'backbone.name' is 3"),
        (_edited(backbone_depth=None), "has no 'backbone.depth' key"),
        (_edited(backbone_width=16), "does not fit the module"),
    ],
    ids=["junk", "empty", "list", "no_backbone", "str_channels", "str_width", "int_name", "no_depth", "width"],
)
def test_damaged_spec_is_an_export_error_naming_file_and_key(tmp_path, edit, fragment):
    ckpt, _, _ = checkpoint_of(tmp_path)
    out = export_backbone(ckpt, tmp_path / "b.pt")
    spec = out.with_name("b.pt.json")
    spec.write_text(edit(json.loads(spec.read_text())))
    with pytest.raises(ExportError, match=r"b\.pt") as caught:
        load_backbone(out)
    assert fragment in str(caught.value)
