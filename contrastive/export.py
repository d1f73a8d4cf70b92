"""Export a trained backbone as a plain ``state_dict``, loadable without this package's training code.

``python -m contrastive.export ckpt=RUN/checkpoints/last.ckpt [out=backbone.pt] [encoder=query|key]`` writes
``out`` (a ``state_dict``: tensors only, ``torch.load(out, weights_only=True)``) and ``out`` + ``.json`` beside it
(the constructor that loads it with ``strict=True``). The ResNets load into torchvision's own constructor with the
classifier removed (``fc = Identity``) and, for ``backbone.small_images=true``, the 32-pixel stem (3x3/1 ``conv1``,
no max-pool); the small CNN loads into :class:`contrastive.models.SmallCNN`. :func:`load_backbone` does both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

PREFIXES = {"query": "backbone.", "key": "key_backbone."}


class ExportError(ValueError):
    """A checkpoint or an exported file that cannot be exported or loaded; the message names the file."""


def backbone_spec(backbone_cfg: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """What builds the module the state_dict fits: the backbone config, the input channels and, in words, the
    constructor call (torchvision's, for the ResNets)."""
    name = backbone_cfg["name"]
    spec = {"backbone": dict(backbone_cfg), "in_channels": in_channels}
    if name == "small_cnn":
        args = ", ".join(
            f"{k}={backbone_cfg.get(k, d)}" for k, d in (("width", 32), ("depth", 4), ("pool_size", 1), ("fc_dim", 0))
        )
        spec["constructor"] = f"contrastive.models.SmallCNN(in_channels={in_channels}, {args})"
        return spec
    steps = [f"net = torchvision.models.{name}(weights=None)", "net.fc = torch.nn.Identity()"]
    if backbone_cfg.get("small_images", True):
        steps += [
            f"net.conv1 = torch.nn.Conv2d({in_channels}, 64, 3, stride=1, padding=1, bias=False)",
            "net.maxpool = torch.nn.Identity()",
        ]
    elif in_channels != 3:
        steps.append(f"net.conv1 = torch.nn.Conv2d({in_channels}, 64, 7, stride=2, padding=3, bias=False)")
    spec["constructor"] = "; ".join(steps)
    return spec


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The empty module of :func:`backbone_spec`: the training code's own constructor, which builds the ResNets
    with torchvision's (tests check that the stated torchvision recipe loads the same weights)."""
    from omegaconf import OmegaConf

    from contrastive.models import backbone_from_config

    try:
        return backbone_from_config(OmegaConf.create(spec["backbone"]), int(spec["in_channels"]))
    except ValueError as err:
        raise ExportError(str(err)) from None


def backbone_state(ckpt: str | Path, encoder: str = "query") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone's ``state_dict`` from a training checkpoint (read without unpickling code), and its spec."""
    from contrastive.checkpoints import read_run_checkpoint

    path = Path(ckpt)
    if not path.is_file():
        raise ExportError(f"ckpt={str(path)!r} does not exist")
    if encoder not in PREFIXES:
        raise ExportError(f"encoder={encoder!r} is not known; choose query or key")
    try:
        state, cfg = read_run_checkpoint(path)
    except ValueError as err:
        raise ExportError(str(err)) from None
    prefix = PREFIXES[encoder]
    weights = {k[len(prefix) :]: v.clone() for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise ExportError(
            f"ckpt={str(path)!r} has no {encoder} encoder (method {cfg['method']['name']}): "
            "only methods with a momentum encoder have encoder=key"
        )
    return weights, backbone_spec(cfg["backbone"], int(cfg["data"]["channels"]))


def export_backbone(ckpt: str | Path, out: str | Path | None = None, encoder: str = "query") -> Path:
    """Write the backbone of ``ckpt`` to ``out`` (default: beside the checkpoint, ``<name>.backbone.pt``) and its
    spec to ``out.json``; the written state_dict is checked to load strictly into the spec's constructor."""
    from contrastive.checkpoints import atomic_torch_save

    weights, spec = backbone_state(ckpt, encoder)
    build_from_spec(spec).load_state_dict(weights, strict=True)
    path = Path(out) if out else Path(ckpt).with_suffix(".backbone.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(weights, path)
    spec_path = path.with_name(path.name + ".json")
    spec_path.write_text(
        json.dumps({**spec, "encoder": encoder, "checkpoint": str(Path(ckpt).resolve())}, indent=2) + "\n"
    )
    return path


def load_backbone(path: str | Path, spec: dict[str, Any] | None = None) -> nn.Module:
    """The exported backbone at ``path``, built from its spec (``path.json`` unless given) and loaded strictly."""
    from contrastive.checkpoints import read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    if spec is None:
        spec_path = path.with_name(path.name + ".json")
        if not spec_path.is_file():
            raise ExportError(
                f"{spec_path} is missing: it says which constructor {path.name} loads into "
                "(pass spec= to load_backbone)"
            )
        spec = json.loads(spec_path.read_text())
    try:
        weights = read_checkpoint(path)  # checksums verified, tensors only
    except ValueError as err:
        raise ExportError(str(err)) from None
    net = build_from_spec(spec)
    net.load_state_dict(weights, strict=True)
    return net.eval()


USAGE = "usage: python -m contrastive.export ckpt=PATH [out=PATH] [encoder=query|key]"


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = set(args) - {"ckpt", "out", "encoder"}
    if "ckpt" not in args or unknown:
        print(f"{USAGE}{' (unknown: ' + ', '.join(sorted(unknown)) + ')' if unknown else ''}", file=sys.stderr)
        return 2
    try:
        path = export_backbone(args["ckpt"], args.get("out"), args.get("encoder", "query"))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = json.loads(path.with_name(path.name + ".json").read_text())
    print(
        f"wrote {path} ({spec['backbone']['name']}); load it with contrastive.export.load_backbone({str(path)!r})"
        f" or: {spec['constructor']}; net.load_state_dict(torch.load(path, weights_only=True))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
