"""Checkpoints on disk: the atomic writer, the one reader (checksums verified, nothing unpickled), finding the one
to resume, and the checks that a run folder and a checkpoint fit the run before any work starts."""

from __future__ import annotations

import logging
import os
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from contrastive.errors import ConfigError, require

log = logging.getLogger("contrastive")


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """Writes ``last.ckpt`` at the end of every training epoch. With no monitor the top-1 checkpoint is the latest
    one; the ``save_last`` option is not used because Lightning 2.6 writes it only together with a top-k checkpoint,
    so with ``save_top_k=0`` it would appear only when training ends, and a crash would lose the whole run.

    At every training epoch's end, validated or not (Lightning's default saves after validation only when it does
    not run every epoch), and always to ``last.ckpt``: a ``last.ckpt`` the callback did not write itself (a copied
    folder, an unreadable file skipped by ``resume=auto``) is replaced, never kept beside a ``last-v1.ckpt``."""
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target's folder, fsyncs it, then renames it over the target:
    a crash or a full disk while saving leaves the previous checkpoint as it was, never a truncated one. Reads
    (Lightning's resume) go through :func:`read_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            # remote storage: Lightning's own transaction-based write
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if "://" in str(path):  # remote storage: Lightning's fsspec reader
            return super().load_checkpoint(path, *args, **kwargs)
        return read_checkpoint(path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hidden name that no `*.ckpt` glob matches; unique per writer
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder's entry is on disk
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped, after the zip's checksums were verified; tensors and plain values
    only (``weights_only``: nothing in the file can run code). Raises ``ValueError`` naming the file if it cannot
    be read. The one reader of checkpoints for every entry point."""
    verify_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises many kinds of error for a damaged file
        raise ValueError(
            f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err}); it is truncated, "
            "damaged or not a checkpoint"
        ) from err


def read_run_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint of a training run (:func:`read_checkpoint`) and the config it was trained with; ``ValueError``
    ``ckpt=... is not a contrastive checkpoint`` if it cannot be read or holds no config and weights."""
    try:
        state = read_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"ckpt={str(path)!r} is not a contrastive checkpoint: {err}") from None
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if not isinstance(cfg, dict) or "state_dict" not in state:
        raise ValueError(f"ckpt={str(path)!r} is not a contrastive checkpoint (no config inside)")
    return state, cfg


def verify_checksums(path: str | Path) -> None:
    """torch's zip reader does not check the CRC-32 stored for each entry, so a flipped byte inside a tensor would
    load silently; read every entry once and compare (a file that is no zip is left to ``torch.load``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        return
    except (OSError, zlib.error) as err:
        raise ValueError(f"{path} cannot be read as a checkpoint ({err}); it is truncated or damaged") from err
    if bad is not None:
        raise ValueError(
            f"{path} is damaged: the stored checksum of its entry {bad} does not match its bytes "
            "(a corrupted copy or disk); use another checkpoint"
        )


def checkpoint_method(checkpoint: dict[str, Any]) -> str | None:
    """``method.name`` the checkpoint was trained with (from its saved hyper-parameters)."""
    value: Any = checkpoint
    for key in ("hyper_parameters", "cfg", "method", "name"):
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def scan_checkpoints(folder: str | Path) -> list[tuple[Path, str | None, bool]]:
    """Every ``*.ckpt`` in ``folder``, newest first, as ``(path, method, readable)``."""
    folder = Path(folder)
    paths = list(folder.glob("*.ckpt")) if folder.is_dir() else []
    found = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            found.append((path, checkpoint_method(read_checkpoint(path)), True))
        except ValueError:
            found.append((path, None, False))
    return found


def find_resume_checkpoint(
    folder: str | Path, method: str, scanned: list[tuple[Path, str | None, bool]] | None = None
) -> tuple[Path | None, str]:
    """The newest readable ``*.ckpt`` in ``folder`` trained with ``method``, and a line saying what was found."""
    skipped = []
    for path, found, readable in scan_checkpoints(folder) if scanned is None else scanned:
        if not readable:
            skipped.append(f"{path.name} (unreadable)")
            continue
        if found == method:
            return path, f"resume=auto: resuming from {path}"
        skipped.append(f"{path.name} (method {found})")
    why = f"; skipped {', '.join(skipped)}" if skipped else ""
    return None, f"resume=auto: no {method} checkpoint in {folder}{why}; starting a fresh run"


def resume_checkpoint(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path`` if given; with ``resume=auto`` the newest checkpoint of this method in the run folder, if any.
    A readable checkpoint of another method there is another run's: refused, never trained over."""
    if cfg.ckpt_path or cfg.resume != "auto":
        return cfg.ckpt_path
    folder = out / "checkpoints"
    scanned = scan_checkpoints(folder)
    path, line = find_resume_checkpoint(folder, cfg.method.name, scanned)
    others = [(p, found) for p, found, readable in scanned if readable and found != cfg.method.name]
    if path is None and others:
        held, method = others[0]
        whose = f"was trained with method={method}" if method else "holds no method (not a contrastive run)"
        keep = f"continue it with method={method}, or " if method else ""
        raise ConfigError(
            f"resume=auto with method={cfg.method.name}: the run folder {out} holds another run "
            f"({held.relative_to(out)} {whose}), which this run would overwrite: {keep}start this run in a new "
            "folder (hydra.run.dir=... or output_dir=...)"
        )
    log.info(line)
    if path:
        check_resume(cfg, str(path))
    return str(path) if path else None


def check_run_folder(out: Path, ckpt_path: str | None, auto: bool = False) -> None:
    """A run folder holds one run: a new run (or one resumed from another folder's checkpoint) into a folder that
    already holds a run's summary or checkpoints would overwrite its config, summary and log and leave its
    checkpoint beside the new one. With ``resume=auto`` and no readable checkpoint a fresh start is what was asked
    for (it replaces unreadable checkpoints), unless the folder holds a finished run's summary."""
    held = [p for p in (out / "metrics.json", *sorted((out / "checkpoints").glob("*.ckpt"))) if p.is_file()]
    if auto and ckpt_path is None:
        held = held[:1] if held and held[0].name == "metrics.json" else []
    own = ckpt_path is not None and Path(ckpt_path).resolve().parent == (out / "checkpoints").resolve()
    if held and not own:
        found = ", ".join(str(p.relative_to(out)) for p in held[:3])
        # with resume=auto already given, only its finished summary is left (no checkpoint of this method)
        fix = "" if auto else "continue it with resume=auto, or "
        what = "a finished run" if auto else "a run"
        raise ConfigError(
            f"the run folder {out} already holds {what} ({found}): {fix}"
            "start this one in a new folder (hydra.run.dir=... or output_dir=...)"
        )


# what a finished run's figures depend on: a run folder whose finished run had other values of these is not this run
TRAINED_BY = ("method", "backbone", "augment", "optim", "seed", "data")
DATA_PLACE = ("root", "num_workers", "download", "on_device")  # where the data lies and how it is read, not what


def check_finished_settings(cfg: Any, out: Path, ckpt_path: str | None) -> None:
    """With ``resume=auto``, a run folder whose run has finished keeps its ``metrics.json`` as this run's summary;
    that is only right if it trained these settings. A sweep run again after its settings changed (a method retuned)
    would otherwise keep the old figures under the new settings without a word."""
    done, ran = out / "metrics.json", out / "config.yaml"
    if ckpt_path is None or not done.is_file() or not ran.is_file():
        return
    before = OmegaConf.to_container(OmegaConf.load(ran), resolve=False)
    now = OmegaConf.to_container(cfg, resolve=True)
    differ = []
    for group in TRAINED_BY:
        old, new = before.get(group, _ABSENT), now.get(group, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(old):  # a key the run's code did not have yet kept its default then
                if not (group == "data" and key in DATA_PLACE) and old[key] != new.get(key, _ABSENT):
                    differ.append(f"{group}.{key} (ran {old[key]}, now {new.get(key, 'absent')})")
        elif old != new:
            differ.append(f"{group} (ran {old}, now {new})")
    if differ:
        raise ConfigError(
            f"resume=auto: the run folder {out} holds a finished run with other settings: {', '.join(differ[:4])}"
            f"{' ...' if len(differ) > 4 else ''}; its metrics.json would be kept as this run's. Move the folder "
            "aside to train these settings, or run with the settings it holds"
        )


def prepare_checkpoint_folder(folder: Path) -> None:
    """Removes the temporary files of saves cut short (a kill mid-save), and checks that a checkpoint can be
    written here (a read-only folder, a path too long) before any training, not at the end of the first epoch."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
        # the same name length as the atomic save's temporary file
        probe = folder / f".last.ckpt.{os.getpid()}.{'0' * 8}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write checkpoints into {folder} ({err.strerror or err}): choose a writable run "
            "folder with a shorter path (hydra.run.dir=... or output_dir=...)"
        ) from None


def check_compatible(model: L.LightningModule, ckpt_path: str) -> dict[str, Any]:
    """The checkpoint's tensors have this model's names and shapes (a changed width, head, bank or queue size would
    otherwise fail inside ``fit`` with a long traceback); returns the checkpoint."""
    checkpoint = read_checkpoint(ckpt_path)
    saved = model.upgrade_state_dict(checkpoint["state_dict"])  # names of earlier layouts, as loading renames them
    own = model.state_dict()
    problems = [f"{k} missing" for k in own if k not in saved] + [f"{k} unexpected" for k in saved if k not in own]
    problems += [
        f"{k} has shape {list(saved[k].shape)}, this config gives {list(v.shape)}"
        for k, v in own.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} does not fit this config's model ({shown}): resume with the "
            "config it was trained with (its run folder's config.yaml)"
        )
    return checkpoint


def keep_previous_log(csv: Path) -> None:
    """Lightning's CSV logger deletes an existing ``metrics.csv``: a run resumed in its own folder keeps the
    interrupted part's log beside the new one."""
    if csv.is_file():
        kept = csv.with_name(f"metrics.before-resume-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        csv.rename(kept)
        log.info("resuming: the interrupted run's log is kept as %s", kept)


# keys a resumed run cannot honour: another optimiser (or other parameter groups) cannot take the saved optimiser
# state, and the random streams continue from the checkpoint whatever the seed
NOT_APPLIED_ON_RESUME = ("optim.exclude_norm_bias", "seed")


def check_resume(cfg: Any, path: str) -> None:
    """The checkpoint exists, can be read (checksums verified, no pickled code), was trained with the same method
    and optimiser, and differs from this config only in keys a resumed run applies. Everything else in the config
    applies on resume: the model and data are built from it, and ``ResumeSettings`` re-applies the optimiser's
    settings (learning rate, weight decay, momentum, schedule) over the checkpoint's."""
    file = Path(path).expanduser()
    where = f"ckpt_path={path!r}" + ("" if file.is_absolute() else f" ({file.resolve()})")
    require(
        file.is_file(),
        f"{where} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or resume=auto",
    )
    try:
        checkpoint = read_checkpoint(file)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    found, method = checkpoint_method(checkpoint), cfg.method.name
    require(
        found == method,
        f"{where} was trained with method.name={found!r}, not {method!r}: resume it with "
        f"method={found}, or drop ckpt_path to start {method} afresh",
    )
    saved = checkpoint.get("hyper_parameters", {}).get("cfg", {})
    optim = saved.get("optim", {}).get("name")
    require(
        optim in (None, cfg.optim.name),
        f"optim.name={cfg.optim.name}: {where} was trained with optim.name={optim!r}, whose state cannot be "
        f"loaded into another optimiser: resume it with optim={optim}, or drop ckpt_path to start afresh",
    )
    differ = []
    for key in NOT_APPLIED_ON_RESUME:
        before, now = _get(saved, key), _get(cfg, key)
        if before is not _ABSENT and before != now:
            differ.append(f"{key} (checkpoint {before}, now {now})")
    require(
        not differ,
        f"{where}: these keys differ from the checkpoint's config and cannot be applied on resume: "
        f"{', '.join(differ)}; resume with the checkpoint's values (its run folder's config.yaml), or drop "
        "ckpt_path to start afresh",
    )


_ABSENT = object()


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(node, "get"):
            return _ABSENT
        node = node.get(part, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node
