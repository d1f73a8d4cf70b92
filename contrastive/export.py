"""Export a trained backbone as a plain ``state_dict``, loadable without this package's training code.

``python -m contrastive.export ckpt=RUN/checkpoints/last.ckpt [out=backbone.pt] [encoder=query|key]`` writes
``out`` (a ``state_dict``: tensors only, ``torch.load(out, weights_only=True)``) and ``out`` + ``.json`` beside it
(the constructor that loads it with ``strict=True``); an existing ``out`` is replaced only with ``overwrite=true``,
and never when it is the checkpoint itself. The ResNets load into torchvision's own constructor with the
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

# where each encoder's backbone lives in a checkpoint (the key encoder's name before the components became modules too)
PREFIXES = {"query": ("backbone.",), "key": ("key_encoder.backbone.", "key_backbone.")}


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
    weights = {}
    for prefix in PREFIXES[encoder]:
        weights = weights or {
            k[len(prefix) :]: v.clone() for k, v in state["state_dict"].items() if k.startswith(prefix)
        }
    if not weights:
        raise ExportError(
            f"ckpt={str(path)!r} has no {encoder} encoder (method {cfg['method']['name']}): "
            "only methods with a momentum encoder have encoder=key"
        )
    return weights, backbone_spec(cfg["backbone"], int(cfg["data"]["channels"]))


def export_target(ckpt: str | Path, out: str | Path | None, overwrite: bool = False) -> Path:
    """Where the export goes (default: beside the checkpoint, ``<name>.backbone.pt``), refused if that is the
    checkpoint itself, a folder, or (unless ``overwrite``) an existing file."""
    path = Path(out) if out else Path(ckpt).with_suffix(".backbone.pt")
    spec_path = path.with_name(path.name + ".json")
    source = Path(ckpt).resolve()
    # resolved paths catch symbolic links and `..`; samefile also a hard link
    if source in (path.resolve(), spec_path.resolve()) or any(
        p.is_file() and source.is_file() and p.samefile(source) for p in (path, spec_path)
    ):
        raise ExportError(
            f"out={str(path)!r} would overwrite the checkpoint ckpt={str(ckpt)!r} it is exported from: "
            "choose another out=... (e.g. backbone.pt)"
        )
    if path.is_dir():
        raise ExportError(f"out={str(path)!r} is a folder: give a file name, e.g. out={str(path / 'backbone.pt')!r}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ExportError(f"out={str(path)!r}: {path.parent} is a file, not a folder")
    existing = [str(p) for p in (path, spec_path) if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: choose another out=..., "
            "or replace with overwrite=true"
        )
    if spec_path.is_dir():
        raise ExportError(f"{spec_path} is a folder: choose another out=...")
    return path


def export_backbone(
    ckpt: str | Path, out: str | Path | None = None, encoder: str = "query", overwrite: bool = False
) -> Path:
    """Write the backbone of ``ckpt`` to ``out`` (default: beside the checkpoint, ``<name>.backbone.pt``) and its
    spec to ``out.json``; the written state_dict is checked to load strictly into the spec's constructor. An
    existing ``out`` is replaced only with ``overwrite=True``, and never when it is ``ckpt`` itself."""
    from contrastive.checkpoints import atomic_torch_save

    path = export_target(ckpt, out, overwrite)
    weights, spec = backbone_state(ckpt, encoder)
    build_from_spec(spec).load_state_dict(weights, strict=True)
    spec_path = path.with_name(path.name + ".json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(weights, path)
        spec_path.write_text(
            json.dumps({**spec, "encoder": encoder, "checkpoint": str(Path(ckpt).resolve())}, indent=2) + "\n"
        )
    except OSError as err:  # a read-only folder, a path through a file, a full disk
        raise ExportError(f"cannot write out={str(path)!r} ({err.strerror or err}): choose another out=...") from None
    return path


def read_spec(spec_path: Path) -> dict[str, Any]:
    """The spec an export wrote beside its weights, checked key by key; ``ExportError`` naming the file and the
    key if it is damaged or edited into something no constructor takes."""
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{spec_path} is not valid JSON ({err}): export the backbone again") from None
    check_spec(spec, str(spec_path))
    return spec


def check_spec(spec: Any, where: str) -> None:
    """``spec`` has a ``backbone`` object with a string ``name``, an integer ``in_channels``, and backbone keys of the
    types the training config gives them."""
    import dataclasses

    from contrastive.config import BackboneConfig

    fix = "export the backbone again"
    if not isinstance(spec, dict):
        raise ExportError(f"{where} holds a JSON {type(spec).__name__}, not an object with 'backbone': {fix}")
    for key, kind in (("backbone", dict), ("in_channels", int)):
        if key not in spec:
            raise ExportError(f"{where} has no {key!r} key: {fix}")
        if not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            raise ExportError(f"{where}: {key!r} is {spec[key]!r}, expected a JSON {_json_kind(kind)}: {fix}")
    backbone = spec["backbone"]
    for key in ("name", "small_images", "width", "depth"):  # the keys every backbone is built from
        if key not in backbone:
            raise ExportError(f"{where} has no 'backbone.{key}' key: {fix}")
    for field in dataclasses.fields(BackboneConfig):
        if field.name in backbone and type(backbone[field.name]) is not type(field.default):
            raise ExportError(
                f"{where}: 'backbone.{field.name}' is {backbone[field.name]!r}, expected a JSON "
                f"{_json_kind(type(field.default))}: {fix}"
            )


def _json_kind(kind: type) -> str:
    return {dict: "object", int: "integer", bool: "boolean", str: "string", float: "number"}.get(kind, kind.__name__)


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
        where = str(spec_path)
        spec = read_spec(spec_path)
    else:
        where = "the spec given to load_backbone"
        check_spec(spec, where)
    try:
        weights = read_checkpoint(path)  # checksums verified, tensors only
    except ValueError as err:
        raise ExportError(str(err)) from None
    try:
        net = build_from_spec(spec)
    except (ExportError, TypeError, RuntimeError, AttributeError, KeyError) as err:  # a width of 0, a key missing
        raise ExportError(f"{where}: {err}") from None
    try:
        net.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ExportError(f"{path} does not fit the module {where} describes: {err}") from None
    return net.eval()


USAGE = "usage: python -m contrastive.export ckpt=PATH [out=PATH] [encoder=query|key] [overwrite=true|false]"


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = set(args) - {"ckpt", "out", "encoder", "overwrite"}
    overwrite = args.get("overwrite", "false").lower()
    if "ckpt" not in args or unknown or overwrite not in ("true", "false"):
        why = f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""
        why += "" if overwrite in ("true", "false") else f" (overwrite={args['overwrite']!r}: true or false)"
        print(f"{USAGE}{why}", file=sys.stderr)
        return 2
    try:
        path = export_backbone(args["ckpt"], args.get("out"), args.get("encoder", "query"), overwrite == "true")
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
