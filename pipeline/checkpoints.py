"""Training checkpoints of one stage: written whole or not at all, checked when read.

Layout of ``RUN/stage_<j>/checkpoints/``::

    step_<step>.pt      torch file: weights, optimizer, scaler, random states, data position
    step_<step>.json    format, step, epoch, total steps, the options the training was
                        started with, byte count and sha256 of the .pt

Each file is written to a temporary name, flushed to disk and renamed; the .json is
written after its .pt, so a checkpoint without a matching .json is incomplete. The two
newest checkpoints are kept; reading one that fails its checks (a save cut off by a full
disk, a truncated copy) falls back to the one before and says so.
"""

import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import RunStateError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KEEP = 2


class CheckpointError(RunStateError):
    """A checkpoint cannot be read, or does not belong to the training being resumed."""


def random_states() -> dict:
    """Every random generator's state, as tensors and numbers that ``weights_only`` loads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, state: dict) -> Path:
    """Write ``state`` (which holds ``step`` and ``epoch``) as the newest checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    payload = buffer.getvalue()
    name = f"step_{state['step']:09d}"

    path = folder / f"{name}.pt"
    index = {
        "format": CHECKPOINT_FORMAT,
        "step": state["step"],
        "epoch": state["epoch"],
        "total_steps": state.get("schedule", {}).get("total_steps"),
        "requested": state.get("requested", {}),
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        _write_durably(path, payload)
        _write_durably(folder / f"{name}.json", json.dumps(index, indent=2).encode())
    except OSError as err:
        path.unlink(missing_ok=True)
        kept = checkpoint_steps(folder)
        raise CheckpointError(
            f"the checkpoint of step {state['step']} could not be written to {folder} ({err}); "
            + (f"the one of step {kept[-1]} is kept. " if kept else "")
            + "Free disk space, then continue with `train-layer --resume`"
        ) from err

    for old in checkpoint_steps(folder)[:-KEEP]:
        for suffix in (".json", ".pt"):
            (folder / f"step_{old:09d}{suffix}").unlink(missing_ok=True)
    log.debug("checkpoint at step %d written to %s (%d bytes)", state["step"], path, len(payload))
    return path


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the checkpoints in ``folder`` (good or not), oldest first."""
    steps = []
    for path in folder.glob("step_*.pt"):
        try:
            steps.append(int(path.stem.removeprefix("step_")))
        except ValueError:
            continue
    return sorted(steps)


def load_newest(folder: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that passes its checks, or None when there is none.

    A damaged newer checkpoint is renamed to ``*.damaged`` (kept, never read again) and
    named in a warning.
    """
    fell_back = False
    for step in reversed(checkpoint_steps(folder)):
        path = folder / f"step_{step:09d}.pt"
        problem = _check(path)
        if problem is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on bad bytes
                problem = f"torch cannot load it: {type(err).__name__}: {err}"
            else:
                if fell_back:
                    log.warning("resuming from the previous good checkpoint %s", path)
                return state, path
        fell_back = True
        log.warning("checkpoint %s is damaged (%s); falling back to the one before", path, problem)
        for suffix in (".pt", ".json"):
            damaged = path.with_suffix(suffix)
            if damaged.exists():
                os.replace(damaged, damaged.with_name(damaged.name + ".damaged"))
    return None


def remove_checkpoints(folder: Path) -> int:
    """Delete every checkpoint in ``folder`` and any save cut off midway; return how many
    checkpoints there were. Checkpoints set aside as ``*.damaged`` are left."""
    steps = checkpoint_steps(folder)
    for step in steps:
        for suffix in (".json", ".pt"):
            (folder / f"step_{step:09d}{suffix}").unlink(missing_ok=True)
    for partial in folder.glob("step_*.tmp"):
        partial.unlink()
    return len(steps)


def newest_index(folder: Path) -> dict | None:
    """The .json index of the newest checkpoint, unchecked; for status displays."""
    for step in reversed(checkpoint_steps(folder)):
        try:
            return json.loads((folder / f"step_{step:09d}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _check(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be used, or None when it can."""
    try:
        index = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return "its .json index is missing: the save did not finish"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"its .json index is unreadable: {err}"
    if not isinstance(index, dict) or index.get("format") != CHECKPOINT_FORMAT:
        got = index.get("format") if isinstance(index, dict) else index
        return f"format {got!r}, this version reads {CHECKPOINT_FORMAT}"
    payload = path.read_bytes()
    if len(payload) != index.get("bytes"):
        return f"{len(payload)} bytes, its index says {index.get('bytes')}"
    if hashlib.sha256(payload).hexdigest() != index.get("sha256"):
        return "its sha256 differs from its index"
    return None


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
