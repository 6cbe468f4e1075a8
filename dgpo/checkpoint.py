"""Crash-safe checkpoint files and the RNG state.

It is the RNG state that makes a resumed run continue the same curve.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, then renames it into place.

    ``os.replace`` is atomic on POSIX file systems, so a crash or a failure while saving leaves the
    previous file at that path (``last.ckpt`` included) intact, never a half-written one. The
    checkpoint is streamed to disk rather than first serialised into memory, which matters for
    multi-GB state dicts. Remote paths (``s3://`` …) fall back to Lightning's own writer.

    Example:
        ``trainer: {plugins: [{class_path: dgpo.checkpoint.AtomicCheckpointIO}]}`` in YAML.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got "
                            f"{storage_options!r}")
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                             dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def rng_states() -> dict[str, Any]:
    """The global Python, NumPy and torch RNG states, as plain values and tensors.

    Lightning restores weights, optimiser, scheduler, loops and data-module state but not the
    global generators; saving them makes a resumed run draw what an uninterrupted one would.
    Everything is stored as tensors or built-in types so ``torch.load(weights_only=True)`` works.
    """
    version, mt_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": (version, torch.tensor(mt_state, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(int(x) for x in mt_state.tolist()), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def drop_reference_weights(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str,
                           local_metadata: dict[str, Any]) -> None:
    """A ``state_dict`` post-hook: remove the frozen reference model's entries (``reference.``).

    The reference model never changes and reloads from its path, so checkpoints need not hold a
    second copy of the model (:class:`~dgpo.module.RLVRModule` registers this hook).
    """
    for key in [key for key in state_dict if key.startswith(f"{prefix}reference.")]:
        del state_dict[key]


def allow_missing_reference_weights(module: torch.nn.Module, incompatible_keys: Any) -> None:
    """A ``load_state_dict`` post-hook: the frozen reference model's entries may be missing.

    They are, in every checkpoint (:func:`drop_reference_weights`); the reference model keeps the
    weights it was loaded with. Strict loading still refuses any other missing or unexpected key:
    torch checks the lists after its post-hooks have edited them.
    """
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.startswith("reference.")]
