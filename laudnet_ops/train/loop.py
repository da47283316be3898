"""The training loop: teacher → student distillation with the LAUDNet sparsity schedule.

One :class:`Trainer` runs on one process (CPU or one GPU) or as one rank of a ``torchrun`` job; DDP,
autocast and channels_last are switches of :class:`TrainConfig`. Per iteration it sets the Gumbel
temperature of every masker, computes the sparsity bounds of the current (fractional) epoch, and
optimises ``CE + λ · sparsity + α · T² · KL``; per epoch it evaluates, logs a CSV row, plots the curves
and writes a checkpoint that resumes exactly.
"""

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..nn import Masker, set_execution, set_tau, stats
from . import schedules
from .architectures import build_model, load_weights
from .checkpoint import load_checkpoint, rng_state, save_checkpoint
from .data import build_datasets, build_loader, normalization, normalize_batch
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, init_distributed
from .log import CSVLog, plot_curves
from .losses import LaudLoss

__all__ = ["TrainConfig", "Trainer", "param_groups", "is_dynamic"]


@dataclass
class TrainConfig:
    """Every knob of a run; the defaults are the paper's recipe (laudnet-facts.md, "Losses and schedule")."""

    # model
    arch: str = "small_laud_resnet"
    mode: str = "dense"
    granularity: Optional[Tuple[int, ...]] = None
    target: float = 0.5
    width: Tuple[int, ...] = (16, 32, 64)
    depth: Tuple[int, ...] = (1, 2, 2)
    init: Optional[str] = None        # backbone weights: a checkpoint or a (torchvision) state dict
    teacher: Optional[str] = None     # static teacher weights; "init" = the same as --init
    # data
    dataset: str = "auto"             # "auto", "fashion-mnist", "digits" or "folder"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    train_subset: int = 0             # first N shuffled training images (0: all), for quick runs
    val_subset: int = 0
    workers: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128             # per process
    lr: Optional[float] = None        # base learning rate; default lr_per_256 · global batch / 256
    lr_per_256: float = 0.02
    backbone_lr_mult: float = 1.0
    masker_lr_mult: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # LAUDNet
    tau0: float = 5.0
    tau_end: float = 0.1
    bound_warmup: float = 0.33
    sparsity_weight: float = 10.0
    distill_weight: float = 0.5
    temperature: float = 4.0
    # execution
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    eval_execution: str = "masked"    # "masked" (plain PyTorch), "sparse" (the kernels), "auto" (sparse if built)
    find_unused_parameters: bool = False
    threads: int = 0
    seed: int = 0
    max_steps_per_epoch: int = 0      # 0: the whole loader (a cap is for smoke tests)
    # output
    out: str = "runs/laud"
    resume: Optional[str] = None      # a checkpoint path, or "auto" for <out>/last.pt when it exists
    progress: bool = True
    plot: bool = True
    save_every: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_dynamic(model: nn.Module) -> bool:
    """Whether ``model`` has maskers, i.e. needs the sparsity loss and the temperature schedule."""
    return any(isinstance(m, Masker) for m in model.modules())


def param_groups(model: nn.Module, base_lr: float, backbone_mult: float, masker_mult: float,
                 weight_decay: float) -> list:
    """Two SGD groups, backbone and maskers, each with its own learning-rate multiplier."""
    masker_params = {id(p) for m in model.modules() if isinstance(m, Masker) for p in m.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in masker_params]
    maskers = [p for p in model.parameters() if p.requires_grad and id(p) in masker_params]
    groups = [{"params": backbone, "lr": base_lr * backbone_mult, "weight_decay": weight_decay, "name": "backbone"}]
    if maskers:
        groups.append({"params": maskers, "lr": base_lr * masker_mult, "weight_decay": weight_decay,
                       "name": "maskers"})
    return groups


class _PlainProgress:
    """Stand-in for tqdm when it is not installed: a line every tenth of the epoch."""

    def __init__(self, total: int, desc: str, disable: bool):
        self.total, self.desc, self.disable, self.n, self.postfix = total, desc, disable, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and (self.n == self.total or self.n % max(self.total // 10, 1) == 0):
            print(f"{self.desc} {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False)


def _subset(dataset, n: int, seed: int):
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, order.tolist())


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`fit` trains.

    ``datasets`` (``(train, val, DataSpec)``) and ``model`` may be given instead of built, for tests.
    """

    def __init__(self, config: TrainConfig, info: Optional[DistInfo] = None, datasets=None,
                 model: Optional[nn.Module] = None):
        self.cfg = cfg = config
        self.info = info or init_distributed(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._seed(cfg.seed + self.info.rank)
        self.out = Path(cfg.out)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.device = self.info.device

        train_set, val_set, self.spec = datasets or build_datasets(cfg.dataset, cfg.data_dir, cfg.image_size,
                                                                   3 if cfg.arch != "small_laud_resnet" else 1)
        self.in_channels = 1 if cfg.arch == "small_laud_resnet" and self.spec.in_channels == 1 else 3
        self.mean, self.std = normalization(train_set, self.in_channels)
        train_set = _subset(train_set, cfg.train_subset, cfg.seed)
        val_set = _subset(val_set, cfg.val_subset, cfg.seed + 1)
        loader_kw = dict(rank=self.info.rank, world_size=self.info.world_size, seed=cfg.seed, workers=cfg.workers,
                         pin_memory=self.device.type == "cuda")
        self.train_loader = build_loader(train_set, cfg.batch_size, True, **loader_kw)
        self.val_loader = build_loader(val_set, cfg.batch_size, False, **loader_kw)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.model = model if model is not None else self._build(cfg.mode)
        if model is None and cfg.init:
            load_weights(self.model, cfg.init)
        self.dynamic = is_dynamic(self.model)
        self.target = float(getattr(self.model, "target_rate", cfg.target)) if cfg.target is None else cfg.target
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.teacher = self._build_teacher()

        global_batch = cfg.batch_size * self.info.world_size
        self.base_lr = cfg.lr if cfg.lr is not None else schedules.scaled_lr(global_batch, cfg.lr_per_256)
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, self.base_lr, cfg.backbone_lr_mult, cfg.masker_lr_mult, cfg.weight_decay),
            lr=self.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        self.scheduler = schedules.cosine_scheduler(self.optimizer, self.total_steps,
                                                    round(cfg.warmup_epochs * self.steps_per_epoch))
        use_scaler = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.loss_fn = LaudLoss(cfg.sparsity_weight, cfg.distill_weight, cfg.temperature, cfg.label_smoothing)

        self.net = self.model
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=cfg.find_unused_parameters)
        self.epoch, self.step = 0, 0
        self.history = []
        if cfg.resume:
            self._resume(cfg.resume)
        self.log = CSVLog(self.out / "log.csv", self.epoch) if self.info.is_main else None

    # -- construction ------------------------------------------------------------------------------

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build(self, mode: str) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.arch, mode, cfg.granularity, cfg.target, self.spec.num_classes, self.in_channels,
                           cfg.width, cfg.depth)

    def _build_teacher(self) -> Optional[nn.Module]:
        """The frozen static network (same backbone) whose logits the student distils, or None."""
        source = self.cfg.init if self.cfg.teacher == "init" else self.cfg.teacher
        if not source or not self.cfg.distill_weight:
            return None
        teacher = load_weights(self._build("dense"), source)
        set_execution(teacher, "masked")
        teacher.eval().requires_grad_(False).to(self.device)
        if self.cfg.channels_last:
            teacher.to(memory_format=torch.channels_last)
        return teacher

    def _resume(self, resume: str) -> None:
        path = self.out / "last.pt" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            return
        payload = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  scaler=self.scaler, rank=self.info.rank, map_location=self.device)
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.history = payload.get("extra", {}).get("history", [])

    # -- one batch ---------------------------------------------------------------------------------

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor):
        x = normalize_batch(images.to(self.device, non_blocking=True), self.mean, self.std, self.in_channels)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels.to(self.device, non_blocking=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch_position: float) -> dict:
        """One optimisation step at fractional epoch ``epoch_position``; returns the batch's numbers."""
        cfg = self.cfg
        tau = schedules.gumbel_tau(self.step, self.total_steps, cfg.tau0, cfg.tau_end)
        lower, upper = schedules.sparsity_bounds(epoch_position, cfg.epochs, self.target, cfg.bound_warmup)
        set_tau(self.model, tau)
        x, y = self._inputs(images, labels)
        with self._autocast():
            logits = self.net(x)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
        s = self._stats()
        parts = self.loss_fn(logits, y, teacher_logits,
                             s["block_rates"] if self.dynamic and s else None,
                             s["flops_ratio"] if s else None, self.target, (lower, upper))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(parts.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            parts.total.backward()
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        n = y.shape[0]
        return {"n": n, "loss": parts.total.item() * n, "ce": parts.ce.item() * n,
                "sparsity": parts.sparsity.item() * n, "distill": parts.distill.item() * n,
                "correct": (logits.argmax(1) == y).sum().item(),
                "rate": (s["activation_rate"] if s else math.nan) * n,
                "flops": (float(s["flops_ratio"].detach()) if s else math.nan) * n,
                "tau": tau, "lower": lower, "upper": upper}

    def _stats(self) -> Optional[dict]:
        """``laudnet_ops.nn.stats`` of the last forward, or None for a model that records nothing."""
        try:
            return stats(self.model)
        except RuntimeError:
            return None

    # -- epochs ------------------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        self.net.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        keys = ("n", "loss", "ce", "sparsity", "distill", "correct", "rate", "flops")
        sums = dict.fromkeys(keys, 0.0)
        bar = _progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                        not (self.info.is_main and self.cfg.progress))
        last = {}
        for i, (images, labels) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            last = self.train_step(images, labels, self.epoch + i / self.steps_per_epoch)
            for k in keys:
                sums[k] += last[k]
            bar.update(1)
            bar.set_postfix_str(f"loss {last['loss'] / last['n']:.3f} acc {last['correct'] / last['n']:.3f} "
                                f"rate {last['rate'] / last['n']:.3f} tau {last['tau']:.2f}")
        bar.close()
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.info)))
        n = max(totals["n"], 1)
        return {"train_loss": totals["loss"] / n, "train_ce": totals["ce"] / n,
                "train_sparsity": totals["sparsity"] / n, "train_distill": totals["distill"] / n,
                "train_acc": totals["correct"] / n, "train_activation_rate": totals["rate"] / n,
                "train_flops_ratio": totals["flops"] / n, "tau": last.get("tau", math.nan),
                "lower": last.get("lower", math.nan), "upper": last.get("upper", math.nan)}

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict:
        """Accuracy, cross-entropy, activation rate and FLOPs ratio with deterministic (eval) masks.

        Runs the ``eval_execution`` path: "masked" needs nothing compiled, "sparse" runs the kernels,
        "auto" the kernels where this build has them. With hard masks both give the same numbers.
        With several ranks the sums over the disjoint validation shards are added up.
        """
        loader = loader or self.val_loader
        self.model.eval()
        set_execution(self.model, None if self.cfg.eval_execution == "auto" else self.cfg.eval_execution)
        sums = [0.0] * 5  # n, loss, correct, rate, flops
        try:
            for images, labels in loader:
                x, y = self._inputs(images, labels)
                with self._autocast():
                    logits = self.model(x)
                s = self._stats()
                n = y.shape[0]
                loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
                rate = s["activation_rate"] if s else math.nan
                flops = float(s["flops_ratio"].detach()) if s else math.nan
                for j, v in enumerate((n, loss, (logits.argmax(1) == y).sum().item(), rate * n, flops * n)):
                    sums[j] += v
        finally:
            set_execution(self.model, None)
            self.model.train()
        n, loss, correct, rate, flops = all_reduce_sum(sums, self.info)
        n = max(n, 1)
        return {"val_loss": loss / n, "val_acc": correct / n, "val_activation_rate": rate / n,
                "val_flops_ratio": flops / n}

    def fit(self, until: Optional[int] = None) -> dict:
        """Train up to epoch ``until`` (default: all); returns the last epoch's row.

        A finished run also writes ``<out>/summary.json`` and ``<out>/curves.png``.
        """
        row = self.history[-1] if self.history else {}
        stop = self.cfg.epochs if until is None else min(until, self.cfg.epochs)
        while self.epoch < stop:
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": self.epoch + 1, "lr": lr, **self.train_epoch(), **self.evaluate(),
                   "target": self.target if self.dynamic else math.nan}
            row["seconds"] = time.perf_counter() - start
            self.epoch += 1
            self.history.append(row)
            if self.info.is_main:
                self.log.write(row)
                print(self._describe(row), flush=True)
            if self.epoch % self.cfg.save_every == 0 or self.epoch == self.cfg.epochs:
                self.save()
        if self.info.is_main and self.history and self.epoch == self.cfg.epochs:
            self._finish(row)
        return row

    def save(self, path=None) -> None:
        """Checkpoint to ``<out>/last.pt`` (every rank takes part: the RNG states are gathered)."""
        states = all_gather_objects(rng_state(), self.info)
        if self.info.is_main:
            save_checkpoint(path or self.out / "last.pt", model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch, step=self.step,
                            config=self.cfg.to_dict(), rng_states=dict(enumerate(states)),
                            extra={"history": self.history, "spec": dataclasses.asdict(self.spec)})

    def _describe(self, row: dict) -> str:
        text = (f"epoch {row['epoch']}/{self.cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"train acc {row['train_acc']:.4f}  val acc {row['val_acc']:.4f}")
        if self.dynamic:
            text += (f"  val activation rate {row['val_activation_rate']:.3f} (target {self.target:.2f})  "
                     f"val FLOPs ratio {row['val_flops_ratio']:.3f}  tau {row['tau']:.3f}")
        return text + f"  {row['seconds']:.1f}s"

    def _finish(self, row: dict) -> None:
        summary = {"mode": self.cfg.mode, "arch": self.cfg.arch, "dataset": self.spec.name,
                   "epochs": self.cfg.epochs, "target": self.target if self.dynamic else None,
                   "total_seconds": sum(r["seconds"] for r in self.history), **row}
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.cfg.plot:
            try:
                plot_curves(self.out / "log.csv", self.out / "curves.png",
                            f"{self.cfg.arch} {self.cfg.mode} on {self.spec.name}")
            except ImportError:
                print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
