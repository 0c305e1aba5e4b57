"""SwAV training over prepared shards: one process per device, launched plainly or under ``torchrun``.

The loop follows swav's ``main_swav.py`` (normalise prototypes, multi-crop forward, codes by
distributed Sinkhorn with an optional queue, swapped prediction, prototypes frozen for the first
iterations), with state held in objects rather than globals, an optional supervised term (the
paper's "optional supervision"), AMP on GPU, and checkpoints that resume to the same next loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pretrain import checkpoint
from pretrain.augment import MultiCrop
from pretrain.config import PretrainConfig
from pretrain.data import Batch, ShardStream
from pretrain.model import SwAVModel
from pretrain.monitor import CollapseWatch, MetricsLog
from pretrain.optim import build_optimizer, learning_rate
from pretrain.runtime import Runtime
from pretrain.swav import EmbeddingQueue, SwAVLoss, cluster_usage

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    log: Path | None = None


class Trainer:
    """Owns one rank's model, optimiser, queue and data stream for a run written to ``out``."""

    def __init__(self, shards: Path, config: PretrainConfig, out: Path, runtime: Runtime) -> None:
        self.config = config
        self.out = out
        self.runtime = runtime
        run = config.run
        torch.manual_seed(run.seed)
        self.stream = ShardStream(
            shards, MultiCrop(config.crops, config.augment, config.model.encoder.in_channels),
            run.batch_size, seed=run.seed, rank=runtime.rank, world=runtime.world,
            mix_shards=run.mix_shards, labels=config.supervised.labels,
        )
        self.model = SwAVModel(
            config.model.encoder, config.model.hidden_dim, config.model.out_dim, config.model.prototypes,
            supervised_outputs=len(config.supervised.labels) if config.supervised.weight > 0 else 0,
        ).to(runtime.device)
        if run.sync_batchnorm and runtime.distributed:
            if runtime.device.type == "cpu":
                log.warning("run.sync_batchnorm ignored: PyTorch's SyncBatchNorm needs GPUs, batch norm stays per rank")
            else:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ddp: torch.nn.Module = (
            DistributedDataParallel(self.model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
            if runtime.distributed else self.model
        )
        self.loss = SwAVLoss(config.swav.temperature, config.swav.epsilon, config.swav.sinkhorn_iterations,
                             config.swav.assign_crops)
        self.queue = (
            EmbeddingQueue(len(config.swav.assign_crops), config.swav.queue_length, config.model.out_dim).to(runtime.device)
            if config.swav.queue_length else None
        )
        self.global_batch = run.batch_size * runtime.world
        self.peak_lr = config.optim.lr * self.global_batch / 256
        self.optimizer = build_optimizer(self.model, config.optim, self.peak_lr)
        on_gpu = runtime.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp) if on_gpu else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=on_gpu and run.amp == "fp16")
        self.steps_per_epoch = self.stream.batches_per_epoch
        self.total_steps = run.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, run.max_steps or self.total_steps)
        self.step = 0

    def resume(self) -> bool:
        """Load ``out``'s checkpoint if there is one; refuse one made with another model recipe."""
        path = self.out / checkpoint.CHECKPOINT
        if not path.is_file():
            return False
        state = checkpoint.load(path, self.runtime.device)
        saved_model = state["config"]["model"]
        if saved_model != self.config.model.model_dump(mode="json"):
            raise ValueError(f"{path} was trained with model {saved_model}, not this config's model section")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if self.queue is not None:
            queue_state = checkpoint.load(checkpoint.queue_path(self.out, self.runtime.rank), self.runtime.device)
            self.queue.load_state_dict(queue_state["queue"])
            rng = queue_state["rng"]
        checkpoint.set_rng_state(rng)
        return True

    def save(self) -> Path:
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "shards": self.stream.shards.manifest.model_dump(mode="json", exclude={"shards"}),
            "global_batch": self.global_batch,
            "world": self.runtime.world,
        }
        queue = self.queue.state_dict() if self.queue is not None else None
        path = checkpoint.save(self.out, state, queue, self.runtime.rank)
        if self.runtime.distributed:
            dist.barrier()
        return path

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step; returns this rank's loss terms and the (global) cluster usage."""
        crops, target, mask = batch
        views = [v.to(self.runtime.device, non_blocking=True) for v in crops]
        target, mask = target.to(self.runtime.device), mask.to(self.runtime.device)
        epoch = self.step // self.steps_per_epoch
        lr = learning_rate(self.step, self.total_steps, self.peak_lr, self.config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.normalise_prototypes()
        with torch.autocast(self.runtime.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            output = self.ddp(views, self.config.global_crops)
        swav_cfg = self.config.swav
        use_queue = self.queue is not None and epoch >= swav_cfg.queue_start_epoch
        queue_scores = None
        if self.queue is not None and use_queue:
            if self.queue.ready:
                queue_scores = self.queue.scores(self.model.prototypes.weight.detach())
            self.queue.push([output.embeddings[c] for c in swav_cfg.assign_crops])
        swav_loss, codes = self.loss(output.scores, queue_scores)
        loss = swav_loss
        supervised = torch.zeros((), device=self.runtime.device)
        if output.supervised is not None:
            repeats = self.config.global_crops
            per_label = F.binary_cross_entropy_with_logits(
                output.supervised.float(), target.repeat(repeats, 1), reduction="none")
            weights = mask.repeat(repeats, 1)
            supervised = (per_label * weights).sum() / weights.sum().clamp_min(1)
            loss = loss + self.config.supervised.weight * supervised
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.step < swav_cfg.freeze_prototypes_steps:
            self.model.prototypes.weight.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        entropy, perplexity = cluster_usage(codes, self.config.model.prototypes)
        return {"lr": lr, "loss": float(loss.detach()), "swav_loss": float(swav_loss.detach()),
                "supervised_loss": float(supervised.detach()), "cluster_entropy": entropy,
                "cluster_perplexity": perplexity}

    def batches(self) -> DataLoader[Batch]:
        """This epoch's loader, starting after the batches of the epoch already trained on."""
        self.stream.set_epoch(self.step // self.steps_per_epoch, self.step % self.steps_per_epoch)
        workers = self.config.run.loader_workers
        return DataLoader(self.stream, batch_size=None, num_workers=workers,
                          pin_memory=self.runtime.device.type == "cuda",
                          prefetch_factor=2 if workers else None, persistent_workers=False)


def _mean_over_ranks(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    if not runtime.distributed:
        return values
    keys = ["loss", "swav_loss", "supervised_loss"]
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return {**values, **{k: float(v) / runtime.world for k, v in zip(keys, tensor.tolist(), strict=True)}}


def train(
    shards: Path, config: PretrainConfig, out: Path, runtime: Runtime, *, resume: bool = True,
    progress: bool = True, console: Console | None = None,
) -> TrainResult:
    """Train until the schedule's end or ``run.max_steps``; checkpoint every N steps and at the end."""
    console = console or Console(stderr=True)
    trainer = Trainer(shards, config, out, runtime)
    out.mkdir(parents=True, exist_ok=True)
    if resume and trainer.resume() and runtime.is_main:
        console.print(f"resumed from {out / checkpoint.CHECKPOINT} at step {trainer.step}")
    main = runtime.is_main
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    metrics = MetricsLog(out, config.run.tensorboard, console.print) if main else None
    watch = CollapseWatch(config.model.prototypes, start_step=config.swav.freeze_prototypes_steps + 10)
    result = TrainResult(steps=trainer.step, log=metrics.path if metrics else None)
    bar = Progress(TextColumn("pretrain"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=console, disable=not (progress and main))
    task = bar.add_task("train", total=trainer.stop_at, completed=trainer.step, info="")
    window_start, window_steps = time.perf_counter(), 0
    with bar:
        while trainer.step < trainer.stop_at:
            for batch in trainer.batches():
                values = trainer.train_step(batch)
                result.losses.append(values["loss"])
                window_steps += 1
                if trainer.step % config.run.log_every == 0 or trainer.step == trainer.stop_at:
                    values = _mean_over_ranks(values, runtime)
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * trainer.global_batch / max(elapsed, 1e-9)
                    window_start, window_steps = time.perf_counter(), 0
                    if metrics is not None:
                        metrics.write({"step": trainer.step, "epoch": (trainer.step - 1) // trainer.steps_per_epoch,
                                       "images_per_s": rate, **values})
                        for message in watch.check(trainer.step, values["swav_loss"], values["cluster_perplexity"]):
                            console.print(f"[yellow]warning:[/] {message}")
                            log.warning(message)
                    bar.update(task, info=f"loss {values['loss']:.3f}  {rate:.1f} img/s")
                bar.update(task, completed=trainer.step)
                if trainer.step % config.run.checkpoint_every == 0:
                    result.checkpoint = trainer.save()
                if trainer.step >= trainer.stop_at or trainer.step % trainer.steps_per_epoch == 0:
                    break
    result.checkpoint = trainer.save()
    result.steps = trainer.step
    if metrics is not None:
        metrics.close()
    return result
