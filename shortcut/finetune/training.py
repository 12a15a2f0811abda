"""Generic training plumbing of ``shortcut-finetune``: accelerate, checkpoints, the loop.

Each training stage (the LoRA adapter, the exit heads' select and final phases) gets its
own Accelerator from :func:`make_accelerator` and runs :func:`train_loop`: a learning
rate with warm-up and cosine decay (:func:`lr_factor`), batches that are a pure function
of ``(seed, step)`` (:func:`batch_indices`), optional early stopping on an evaluation,
and checkpoints in a :class:`Checkpoints` folder from which an interrupted run resumes
with the same result as an uninterrupted one. Nothing here knows about exit heads,
policies or skills folders.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def make_accelerator() -> Any:
    """A fresh Accelerator per training stage (so each checkpoint holds only its own
    module). Layer dropout leaves parameters unused in some steps, hence
    ``find_unused_parameters`` under DDP."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])

    def adapter_only(models: list, weights: list, output_dir: str) -> None:
        # A LoRA model's state dict holds the whole base model; checkpoint the adapter only.
        for i, state in enumerate(weights):
            if any("lora_" in k for k in state):
                weights[i] = {k: v for k, v in state.items() if "lora_" in k}

    accelerator.register_save_state_pre_hook(adapter_only)
    return accelerator


class Checkpoints:
    """A run's checkpoint folder (``<output>/checkpoints/`` of ``shortcut-finetune``):
    ``run.json`` (the run's settings), ``<stage>-<step>/`` folders written by
    ``accelerator.save_state`` plus ``trainer_state.json``, finished stages' results as
    ``<stage>.json`` and cached data as ``<name>.data.json``. Nothing is written when
    ``every`` is 0."""

    def __init__(self, folder: Path, run: dict[str, Any], every: int, keep: int, accelerator: Any) -> None:
        self.folder, self.run, self.every, self.keep = folder, run, every, max(1, keep)
        self.accelerator = accelerator

    def ready(self) -> None:
        """Create the folder and its ``run.json`` if they are missing."""
        if not (self.folder / "run.json").is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "run.json").write_text(json.dumps({"run": self.run}, indent=2) + "\n")

    def _write_json(self, name: str, obj: Any) -> None:
        if self.every and self.accelerator.is_main_process:
            self.ready()
            tmp = self.folder / f".{name}.tmp"
            tmp.write_text(json.dumps(obj) + "\n")
            tmp.replace(self.folder / name)
        self.accelerator.wait_for_everyone()

    def _read_json(self, name: str) -> Any:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    def data(self, name: str) -> Any:
        """Cached data ``name``, or ``None`` if none was saved."""
        return self._read_json(f"{name}.data.json")

    def save_data(self, name: str, obj: Any) -> None:
        """Cache data ``name`` (when checkpointing, on the main process)."""
        self._write_json(f"{name}.data.json", obj)

    def result(self, stage: str) -> Any:
        """A finished stage's result, or ``None`` if the stage has not finished."""
        return self._read_json(f"{stage}.json")

    def finish(self, stage: str, result: Any) -> None:
        """Record a stage's result, marking it finished."""
        self._write_json(f"{stage}.json", result)

    def latest(self, stage: str) -> Path | None:
        """The stage's newest checkpoint folder, or ``None``."""
        found = sorted(self.folder.glob(f"{stage}-[0-9]*")) if self.folder.is_dir() else []
        return found[-1] if found else None

    def save(self, accelerator: Any, stage: str, state: dict[str, Any]) -> None:
        """Checkpoint a stage (``accelerator`` is the stage's own) atomically; keep the
        latest ``keep``."""
        if accelerator.is_main_process:
            self.ready()
        accelerator.wait_for_everyone()
        final = self.folder / f"{stage}-{state['step']:07d}"
        tmp = self.folder / f".{final.name}.tmp"
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
            tmp.rename(final)
            for old in sorted(self.folder.glob(f"{stage}-[0-9]*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


def batch_indices(n: int, step: int, batch_size: int, seed: int, accelerator: Any) -> torch.Tensor:
    """The indices this process takes from the global batch of ``step``: a pure function of
    ``(seed, step)``, so a resumed run sees exactly the batches it would have seen."""
    per_epoch = max(1, n // batch_size)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    size = min(batch_size, n)
    chunk = order[slot * size:(slot + 1) * size]
    return chunk[accelerator.process_index::accelerator.num_processes]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to zero."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_loop(stage: str, accelerator: Any, optimizer: torch.optim.Optimizer, loss_fn: Callable[[int], torch.Tensor],
               *, steps: int, lr: float, warmup: float, ckpt: Checkpoints, eval_fn: Callable[[], dict] | None = None,
               eval_every: int = 0, patience: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run ``steps`` optimiser steps of ``loss_fn(step)`` (this process's loss on its
    share of the batch), with checkpoints, resume and early stopping on
    ``eval_fn()["loss"]``. Returns the trainer state: losses per step, evaluations,
    ``best_step``, ``step`` (steps run)."""
    from tqdm.auto import tqdm

    state: dict[str, Any] = {"step": 0, "losses": [], "evals": [], "best": None, "best_step": 0, "bad": 0}
    found = ckpt.latest(stage)
    if found is not None:
        accelerator.load_state(str(found), strict=False)
        state = json.loads((found / "trainer_state.json").read_text())
        logger.info("%s: resumed from %s", stage, found)
    bar = tqdm(total=steps, initial=state["step"], desc=stage,
               disable=not (progress and accelerator.is_local_main_process), leave=False)
    while state["step"] < steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        loss = loss_fn(step)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["losses"].append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
        state["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
        stop = False
        if eval_fn is not None and (state["step"] % eval_every == 0 or state["step"] == steps):
            metrics = eval_fn()
            state["evals"].append({"step": state["step"], **metrics})
            if state["best"] is None or metrics["loss"] < state["best"] - 1e-4 * abs(state["best"]):
                state["best"], state["best_step"], state["bad"] = metrics["loss"], state["step"], 0
            else:
                state["bad"] += 1
                stop = patience > 0 and state["bad"] >= patience
        if ckpt.every and state["step"] % ckpt.every == 0 and state["step"] < steps and not stop:
            ckpt.save(accelerator, stage, state)
        if stop:
            break
    bar.close()
    if eval_fn is None:
        state["best_step"] = state["step"]
    return state
