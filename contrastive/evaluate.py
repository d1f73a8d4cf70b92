"""Evaluation shared by all methods: weighted kNN, few-shot kNN and linear probe, offline linear evaluation.

``python -m contrastive.evaluate ckpt=PATH [eval.linear_epochs=...]`` evaluates a checkpoint on the data set it
was trained on; ``train`` calls :func:`evaluate_features` at the end of every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from contrastive.errors import ConfigError, require
from contrastive.metrics import (
    fewshot_knn_accuracy,
    fewshot_linear_accuracy,
    knn_accuracy,
    linear_accuracy,
)


def check_config(e: Any) -> None:
    """The evaluation keys (``eval.*``), shared by training and ``python -m contrastive.evaluate``."""
    require(e.knn_k >= 1, f"eval.knn_k={e.knn_k} must be >= 1")
    require(e.knn_temperature > 0, f"eval.knn_temperature={e.knn_temperature} must be > 0")
    require(e.fewshot_seeds >= 1, f"eval.fewshot_seeds={e.fewshot_seeds} must be >= 1")
    require(all(shots >= 1 for shots in e.shots), f"eval.shots={list(e.shots)}: each must be >= 1")
    require(e.linear_epochs >= 0, f"eval.linear_epochs={e.linear_epochs} must be >= 0 (0: no offline linear probe)")


EVAL_SPLITS = ("auto", "validation", "test")


def final_split(cfg: Any) -> str:
    """The split the final evaluation (and its baselines) reads: ``eval.split``, where ``auto`` means test if the
    data sets one aside (``data.test_fraction > 0``) and the run is not a tuning trial, else validation. With two
    splits the held-out one is validation: the per-epoch monitor reads it too, and settings may have been chosen on
    it."""
    split = cfg.eval.get("split", "auto")  # a checkpoint saved before the key existed: auto
    if split != "auto":
        return str(split)
    has_test = float(cfg.data.get("test_fraction", 0.0) or 0.0) > 0
    return "test" if has_test and not cfg.get("tuning", False) else "validation"


def check_split(cfg: Any) -> None:
    """``eval.split`` against the data and the run: the test split exists only with ``data.test_fraction > 0``, and
    a tuning trial (``tuning=true``) never reads it, so model selection cannot see the images the final runs are
    judged on."""
    split = cfg.eval.split
    require(split in EVAL_SPLITS, f"eval.split={split!r}; choose one of {', '.join(EVAL_SPLITS)}")
    if split != "test":
        return
    require(
        not cfg.get("tuning", False),
        "eval.split=test in a tuning trial (tuning=true): tuning selects on the validation split and never reads "
        "the test split; set eval.split=validation (or auto), and read test in the final runs",
    )
    test = float(cfg.data.get("test_fraction", 0.0) or 0.0)
    require(
        test > 0,
        f"eval.split=test but data.test_fraction={test} sets no test split aside: set data.test_fraction > 0, or "
        "eval.split=validation",
    )


@torch.no_grad()  # without it every feature holds its image's autograd graph: GBs on 8,000 CIFAR images
def extract_features(
    encoder: nn.Module | None, transform: nn.Module, loader, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Features of every image of ``loader`` (eval transform, no augmentation); ``encoder=None``: raw pixels."""
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval()
    feats, labels = [], []
    for images, y, _ in loader:
        x = transform.to(device)(images.to(device, non_blocking=True))
        feats.append((encoder(x) if encoder is not None else x.flatten(1)).float())
        labels.append(y.to(device))
    if encoder is not None:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def evaluate_features(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg: DictConfig,
    prefix: str = "",
    full: bool = True,
    offline: bool = True,
) -> dict[str, float]:
    """kNN with all labels and with ``cfg.shots`` labels per class (mean over ``cfg.fewshot_seeds`` seeds);
    with ``full``, also few-shot linear probes, and the offline linear probe unless ``offline`` is false."""
    (xt, yt), (xv, yv) = train, val
    seeds = range(cfg.fewshot_seeds)
    knn = dict(k=cfg.knn_k, temperature=cfg.knn_temperature)
    out = {f"{prefix}knn_acc": knn_accuracy(xt, yt, xv, yv, num_classes, **knn)}
    for shots in cfg.shots:
        out[f"{prefix}knn_acc_{shots}shot"] = fewshot_knn_accuracy(xt, yt, xv, yv, num_classes, shots, seeds, **knn)
        if full:
            out[f"{prefix}fewshot_linear_acc_{shots}shot"] = fewshot_linear_accuracy(
                xt, yt, xv, yv, num_classes, shots, seeds
            )
    if full and offline and cfg.linear_epochs > 0:
        out[f"{prefix}offline_linear_acc"] = linear_accuracy(xt, yt, xv, yv, num_classes, epochs=cfg.linear_epochs)
    return {k: round(float(v), 2) for k, v in out.items()}


def evaluate_encoder(
    encoder: nn.Module, transform: nn.Module, datamodule, cfg: DictConfig, device, split: str = "validation", **kwargs
):
    """:func:`evaluate_features` with the training split as the labelled bank and ``split`` as the queries."""
    train_loader, val_loader = datamodule.eval_loaders(split)
    train = extract_features(encoder, transform, train_loader, device)
    val = extract_features(encoder, transform, val_loader, device)
    return evaluate_features(train, val, datamodule.num_classes, cfg, **kwargs)


def evaluate_stages(
    backbone: nn.Module, transform: nn.Module, datamodule, cfg: DictConfig, device, split: str = "validation"
) -> dict:
    """The probes of :func:`evaluate_features` but the offline linear one on every stage of the encoder
    (:mod:`contrastive.metrics.stages`), as ``stage_<name>_<metric>``; ``stages`` lists the names, shallow to deep."""
    from contrastive.metrics.stages import stage_features

    train_loader, val_loader = datamodule.eval_loaders(split)
    train_feats, yt = stage_features(backbone, transform, train_loader, device)
    val_feats, yv = stage_features(backbone, transform, val_loader, device)
    out: dict = {"stages": list(train_feats)}
    for name, xt in train_feats.items():
        out.update(
            evaluate_features(
                (xt, yt), (val_feats[name], yv), datamodule.num_classes, cfg, prefix=f"stage_{name}_", offline=False
            )
        )
    return out


def evaluate_checkpoint(ckpt: str | Path, overrides: dict | None = None) -> dict[str, float]:
    """Rebuild the model and data of a checkpoint from the config stored in it, and evaluate the backbone."""
    from contrastive.checkpoints import read_run_checkpoint
    from contrastive.data.datamodule import ContrastiveDataModule
    from contrastive.methods import method_class

    path = Path(str(ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist")
    # tensors and plain values only, checksums verified: a crafted file cannot run code here
    state, saved = read_run_checkpoint(path)
    hparams = state["hyper_parameters"]
    cfg = OmegaConf.create(saved)
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    model = method_class(cfg.method)(cfg, hparams["num_train"])
    model.load_state_dict(state["state_dict"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    dm = ContrastiveDataModule(cfg.data)
    dm.setup("fit")
    split = final_split(cfg)
    metrics = evaluate_encoder(model.backbone, model.eval_transform, dm, cfg.eval, device, split=split)
    return {"method": cfg.method.name, "data": cfg.data.name, "ckpt": str(path), "eval_split": split, **metrics}


def _apply_overrides(cfg: DictConfig, overrides: dict) -> DictConfig:
    """The checkpoint's config with ``overrides`` merged in: unknown keys and values of the wrong type are refused
    against the typed schema, and the evaluation keys are checked, before any work starts."""
    from contrastive import config as schema

    groups = {"eval": schema.EvalConfig, "data": schema.DataConfig, "perf": schema.PerfConfig}
    OmegaConf.set_struct(cfg, True)  # a mistyped key fails instead of being silently ignored
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
        for group in overrides:
            if group in groups:  # the typed schema refuses a value of the wrong type (eval.linear_epochs=abc)
                try:
                    cfg[group] = OmegaConf.merge(OmegaConf.structured(groups[group]), cfg[group])
                except OmegaConfBaseException as err:
                    raise ValueError(f"{group}.{err.full_key}: {err.msg}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"override not applicable to the checkpoint's config: {err}") from err
    OmegaConf.set_struct(cfg, False)
    try:
        check_config(cfg.eval)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
    if "ckpt" not in args:
        print(
            "usage: python -m contrastive.evaluate ckpt=PATH [eval.linear_epochs=N eval.knn_k=K ...]", file=sys.stderr
        )
        return 2
    ckpt = args.pop("ckpt")
    try:
        metrics = evaluate_checkpoint(ckpt, OmegaConf.to_container(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
