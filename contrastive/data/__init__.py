"""Data sets (:mod:`.datasets`), the data module (:mod:`.datamodule`), batch-wise augmentation (:mod:`.augment`) and
crops cut in the loader (:mod:`.crops`); :func:`check_config` holds the rules of the ``data`` and ``augment`` keys."""

from __future__ import annotations

from typing import Any

from contrastive.errors import ConfigError, require


def check_config(cfg: Any) -> None:
    """The ``data`` and ``augment`` keys, before any file is read: the augmentations and the evaluation transform are
    built once here, so each of their rules (stated where they are built) refuses a bad value before work starts."""
    from contrastive.data.augment import build_augment, build_eval_transform
    from contrastive.data.crops import CROP_SOURCES
    from contrastive.data.datasets import check_name

    data, m = cfg.data, cfg.method
    check_name(data.name)
    require(data.batch_size > 0, f"data.batch_size={data.batch_size} must be > 0")
    in_batch = ", and in-batch negatives (method.negatives=batch) need other samples in the batch"
    require(
        data.batch_size >= 2,
        f"data.batch_size={data.batch_size} must be >= 2: batch norm needs two samples per process"
        + (in_batch if m.get("negatives") == "batch" else ""),
    )
    require(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    require(data.crops in CROP_SOURCES, f"data.crops={data.crops!r}; choose one of {', '.join(CROP_SOURCES)}")
    require(
        data.crops == "stored" or data.name == "imagefolder",
        f"data.crops=full cuts views from image files at their own resolution: only data=imagefolder has them, "
        f"not data.name={data.name!r}; use data.crops=stored",
    )
    _check_fractions(data)
    _check_crop_sizes(cfg)
    try:
        build_augment(cfg.augment, data, m.num_views, m.num_small_views)  # first: it knows data.channels
        build_eval_transform(data)
    except ConfigError:
        raise
    except ValueError as err:  # the augmentations' own rules name the key
        raise ConfigError(str(err)) from None


def _check_fractions(data: Any) -> None:
    """The splits: validation and (data.test_fraction > 0) test are fractions of a pool of images, or of the training
    set of a set that ships its own held-out set (which then is the test split): see datasets.load_splits."""
    val, test = data.val_fraction, data.get("test_fraction", 0.0)
    require(0 < val < 1, f"data.val_fraction={val} must be in (0, 1)")
    require(0 <= test < 1, f"data.test_fraction={test} must be in [0, 1) (0: no test split)")
    require(
        val + test < 1,
        f"data.val_fraction={val} + data.test_fraction={test} must be < 1: the rest is the training split",
    )


def _check_crop_sizes(cfg: Any) -> None:
    """Crops are resized to their size: larger than the image would only upsample, and multi-crop's small views are
    the local ones."""
    large, image = cfg.augment.large.size, cfg.data.image_size
    require(
        large <= image,
        f"augment.large.size={large} is larger than data.image_size={image}; choose augment.large.size <= {image}",
    )
    if cfg.method.num_small_views > 0:
        small = cfg.augment.small.size
        require(
            small < large,
            f"augment.small.size={small} must be smaller than augment.large.size={large} "
            f"(method.num_small_views={cfg.method.num_small_views} small crops are the local views)",
        )
