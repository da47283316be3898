"""Checkpoints that resume a run exactly: model, optimizer, LR scheduler, AMP scaler, position and RNG.

The RNG state matters here more than usual: the Gumbel noise of the maskers is drawn from torch's global
generator, so a resumed run draws the same masks as an uninterrupted one only if that generator is
restored. Each rank's states are saved (ranks draw different noise), keyed by rank.
"""

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint"]


def rng_state() -> Dict[str, Any]:
    # NumPy's key array is stored as a tensor, so that the checkpoint loads with ``weights_only=True``.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, *, model: torch.nn.Module, optimizer, scheduler, scaler, epoch: int, step: int,
                    config: Dict[str, Any], rng_states: Dict[int, Dict[str, Any]], extra: Optional[dict] = None
                    ) -> Path:
    """Write atomically (temporary file, then rename) so an interrupted save never leaves a broken file.

    ``epoch`` is the number of completed epochs, ``step`` the number of completed iterations.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "config": config,
        "rng": rng_states,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, *, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None,
                    rank: int = 0, map_location="cpu") -> Dict[str, Any]:
    """Restore into the given objects (those given) and this rank's RNG; returns the whole payload.

    Everything in it is tensors and plain Python values, so it loads with ``weights_only=True``.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    states = payload.get("rng") or {}
    if rank in states:
        set_rng_state(states[rank])
    elif states:
        # A different number of ranks than the run that saved: fall back to rank 0's and offset torch's
        # seed so the ranks do not draw identical noise.
        set_rng_state(states[min(states)])
        torch.manual_seed(int(torch.initial_seed()) + rank)
    return payload
