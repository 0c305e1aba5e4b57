"""Finetuning a task model on labelled studies, from scratch or from a pretrained encoder.

Every arm of a comparison runs this same code with the same augmentations, step budget and
schedule; only ``init`` (scratch or an exported encoder) and ``regime`` differ. ``hybrid`` adds the
SwAV loss on multi-crop views of the same batch's images to the supervised loss, as in the paper.

Inputs are cached once as stored images (``pretrain.decode.prepare_image``: the pretraining and
inference path) and turned into network input by ``augment.eval_view``; training augmentation is
a random rotation/zoom/intensity/gamma through ``augment.perturb``, the same for all arms.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from config.registry_layout import WEIGHTS
from models.calibration import fit_platt
from models.card import AppliesTo, ModelCard, OutputSpec, new_device_uid, write_card
from models.dataset import StudyItem, read_seg_masks
from models.metrics import dice, roc_auc, youden_threshold
from models.networks import task_network
from models.preprocess import InputSpec, mask_input, neighbour_picks
from models.tasks import CodedConcept, TaskSpec
from pretrain.augment import AugmentConfig, CropSpec, MultiCrop, eval_view, perturb
from pretrain.backbones import Encoder, EncoderSpec
from pretrain.config import OptimConfig
from pretrain.decode import PixelDataError, prepare_image
from pretrain.export import load_encoder, sha256_of
from pretrain.model import SwAVHead, encode_crops
from pretrain.optim import learning_rate
from pretrain.shards import Encoding, decode_hu, decode_unit
from pretrain.swav import SwAVLoss


class FinetuneConfig(BaseModel):
    """One finetuning run's recipe (the experiment fixes it across arms)."""

    model_config = ConfigDict(extra="forbid")

    regime: Literal["supervised", "hybrid"] = "supervised"
    arch: Literal["resnet18", "resnet50", "densenet121"] = "resnet18"
    head_stride: Literal[32, 16, 8, 4] = Field(
        32, description="The feature-map stride a classifier's head reads (models.networks): 32 the pooled "
                        "last stage, finer ones through the U-Net's expanding path")
    input: InputSpec | None = Field(None, description="The network input; None: the task's declared input")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1e-3, gt=0)
    encoder_lr_scale: float = Field(1.0, gt=0, description="Encoder learning rate relative to the heads")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(25, ge=1)
    patience: int = Field(6, ge=1, description="Evaluations without improvement before stopping early")
    hybrid_weight: float = Field(0.5, ge=0)
    hybrid_prototypes: int = Field(100, ge=2)
    rotation_deg: float = 15.0
    scale_jitter: tuple[float, float] = (0.9, 1.1)
    intensity_jitter: float = 0.1
    seed: int = 0
    device: str = "cpu"
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    min_cases_for_threshold: int = Field(
        10, ge=1, description="A finding gets an operating threshold only where validation has at least this many "
                              "positive and this many negative studies; otherwise it is not assessed")
    finding_auc_gate: float = Field(
        0.70, ge=0, le=1, description="A finding whose validation AUC is lower is not assessed, and a classifier whose "
                                      "mean validation study AUC is lower is not deployable; 0 turns both gates off")
    dice_gate: float = Field(
        0.5, ge=0, le=1, description="A segmentation model whose validation mean Dice is lower is not deployable; "
                                     "0 turns the gate off")

    def input_for(self, task: TaskSpec) -> InputSpec:
        """What the network reads: this recipe's ``input``, else the one the task declares."""
        return self.input or task.input

    def encoder_spec(self, task: TaskSpec) -> EncoderSpec:
        return EncoderSpec(arch=self.arch, in_channels=self.input_for(task).in_channels)


@dataclass
class TaskData:
    """Cached samples of one split: stored images, their encodings, targets and study membership."""

    images: torch.Tensor  # (N, S, S) uint16 stored encoding
    encodings: list[Encoding]
    targets: torch.Tensor  # (N, K) float for classification; (N, S, S) uint8 masks for segmentation
    study_of: list[int]
    studies: list[StudyItem]
    study_targets: torch.Tensor  # (studies, K)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.encodings)


def build_data(task: TaskSpec, items: Sequence[StudyItem], spec: InputSpec) -> TaskData:
    """Decode each study's slices once; slices that cannot be decoded are skipped and counted."""
    images: list[np.ndarray] = []
    encodings: list[Encoding] = []
    targets: list[Any] = []
    study_of: list[int] = []
    study_targets = []
    skipped: dict[str, int] = {}
    outputs = task.outputs
    for number, item in enumerate(items):
        masks = read_seg_masks(item) if task.kind == "segmentation" and item.seg_path else {}
        slices = item.slices if task.kind != "classification" else item.slices[:1]
        for ref in slices:
            try:
                stored, encoding = prepare_image(ref.path, ref.frame, spec.size)
            except PixelDataError as exc:
                skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                continue
            images.append(stored)
            encodings.append(encoding)
            study_of.append(number)
            if task.kind == "segmentation":
                mask = masks.get(ref.sop_uid)
                if mask is None:
                    targets.append(torch.zeros(spec.size, spec.size, dtype=torch.uint8))
                else:
                    targets.append(mask_input(mask, ref.path, spec))
            elif task.kind == "slice-classification":
                labels = item.slice_labels.get(ref.sop_uid, {})
                targets.append([float(labels.get(name, 0.0)) for name in outputs])
            else:
                targets.append([float(item.labels.get(name, 0.0)) for name in outputs])
        study_targets.append([float(item.labels.get(name, 0.0)) for name in outputs])
    if not images:
        raise ValueError(f"no decodable images for task {task.name} ({skipped or 'no studies'})")
    target_tensor = (torch.stack(targets) if task.kind == "segmentation"
                     else torch.tensor(targets, dtype=torch.float32))
    return TaskData(torch.from_numpy(np.stack(images).astype(np.int32)).to(torch.int32), encodings,
                    target_tensor, study_of, list(items), torch.tensor(study_targets), skipped)


def network_input(stored: torch.Tensor, encoding: Encoding, spec: InputSpec) -> torch.Tensor:
    """Stored image -> one slice's input (channels, S, S): the mapping shared with evaluation and inference."""
    pixels = stored.numpy().astype(np.uint16)
    decoded = decode_hu(pixels) if encoding == "hu" else decode_unit(pixels)
    return eval_view(torch.from_numpy(decoded), encoding, spec.size, spec.channels, spec.window_pairs())


def batch_inputs(data: TaskData, indices: Sequence[int], spec: InputSpec) -> torch.Tensor:
    """Network inputs (B, in_channels, S, S); a 2.5D spec stacks each slice's neighbours of its study."""
    def one(i: int) -> torch.Tensor:
        return torch.cat([network_input(data.images[j], data.encodings[j], spec)
                          for j in neighbour_picks(data.study_of, i, spec.neighbours)])
    return torch.stack([one(i) for i in indices])


def build_network(task: TaskSpec, encoder: Encoder, config: FinetuneConfig) -> nn.Module:
    return task_network(task.kind, encoder, 1 if task.kind == "segmentation" else len(task.outputs),
                        config.head_stride)


@torch.no_grad()
def predict(network: nn.Module, data: TaskData, spec: InputSpec, device: torch.device, batch: int = 32,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample probabilities: (N, K) for classifiers, (N, S, S) for segmentation."""
    network.eval()
    out = []
    for start in range(0, len(data), batch):
        inputs = batch_inputs(data, range(start, min(start + batch, len(data))), spec)
        if transform is not None:
            inputs = transform(inputs)
        logits = network(inputs.to(device)).float()
        out.append(torch.sigmoid(logits[:, 0] if logits.ndim == 4 else logits).cpu())
    return torch.cat(out)


def study_scores(task: TaskSpec, data: TaskData, probs: torch.Tensor) -> torch.Tensor:
    """Study-level scores (studies, K): slices aggregated by their maximum, which keeps the driving slice."""
    if task.kind == "classification":
        return probs
    if task.kind == "slice-classification":
        scores = torch.zeros(len(data.studies), probs.shape[1])
        for sample, study in enumerate(data.study_of):
            scores[study] = torch.maximum(scores[study], probs[sample])
        return scores
    raise ValueError("segmentation has no study scores")


def validation_metric(task: TaskSpec, data: TaskData, probs: torch.Tensor) -> float:
    """Mean AUC over outputs with both classes present (classification), mean Dice (segmentation)."""
    if task.kind == "segmentation":
        per_study: dict[int, list[int]] = {}
        for sample, study in enumerate(data.study_of):
            per_study.setdefault(study, []).append(sample)
        values = [dice((probs[s] >= 0.5).numpy(), data.targets[s].numpy().astype(bool))
                  for s in per_study.values()]
        return float(np.mean(values))
    scores = study_scores(task, data, probs).numpy()
    truth = data.study_targets.numpy()
    aucs = [roc_auc(truth[:, k], scores[:, k]) for k in range(truth.shape[1])
            if 0 < truth[:, k].sum() < len(truth)]
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class FinetuneResult:
    network: nn.Module
    best_metric: float
    best_step: int
    steps_run: int
    curve: list[tuple[int, float]]
    outputs: list[OutputSpec]  # calibrated, thresholded and gated on validation (choose_thresholds)
    seconds: float
    losses: list[float] = field(default_factory=list)


def _augment(inputs: torch.Tensor, masks: torch.Tensor | None, config: FinetuneConfig,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_images, out_masks = [], []
    for i in range(inputs.shape[0]):
        u = torch.rand(4, generator=generator).tolist()
        angle = (2 * u[0] - 1) * config.rotation_deg
        scale = config.scale_jitter[0] + u[1] * (config.scale_jitter[1] - config.scale_jitter[0])
        intensity = 1 + (2 * u[2] - 1) * config.intensity_jitter
        gamma = math.exp((2 * u[3] - 1) * config.intensity_jitter)
        out_images.append(perturb(inputs[i], rotation_deg=angle, scale=scale, intensity_scale=intensity, gamma=gamma))
        if masks is not None:
            moved = perturb(masks[i][None].float(), rotation_deg=angle, scale=scale)
            out_masks.append(moved[0])
    return torch.stack(out_images), (torch.stack(out_masks) if masks is not None else None)


def _loss(task: TaskSpec, logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    if task.kind == "segmentation":
        prob = torch.sigmoid(logits[:, 0].float())
        truth = (targets >= 0.5).float()
        bce = F.binary_cross_entropy_with_logits(logits[:, 0].float(), truth)
        inter = (prob * truth).sum()
        soft_dice = 1 - (2 * inter + 1) / (prob.sum() + truth.sum() + 1)
        return bce + soft_dice
    return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight)


def finetune(
    task: TaskSpec, train: TaskData, val: TaskData, config: FinetuneConfig, *, encoder: Encoder | None = None,
    progress: Callable[[int, float, float | None], None] | None = None, checkpoint: Path | None = None,
) -> FinetuneResult:
    """Train with early stopping on the validation metric; returns the best state (not the last).

    With ``checkpoint``, every new best state is also written there (safetensors, atomically), so a
    long run that dies still leaves its best model on disk.
    """
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    spec = config.input_for(task)
    encoder = encoder or Encoder(config.encoder_spec(task))
    network = build_network(task, encoder, config).to(device)
    head = (SwAVHead(encoder.feature_dim, 512, 64, config.hybrid_prototypes).to(device)
            if config.regime == "hybrid" else None)
    swav = SwAVLoss()
    multicrop = MultiCrop([CropSpec(size=spec.size, count=2, scale=(0.3, 1.0)),
                           CropSpec(size=spec.size // 2, count=2, scale=(0.05, 0.3))],
                          AugmentConfig(ct_windows=spec.window_pairs()), spec.channels)
    encoder_params = list(network.encoder.parameters())  # type: ignore[union-attr]
    encoder_ids = {id(p) for p in encoder_params}
    other = [p for p in network.parameters() if id(p) not in encoder_ids]
    if head is not None:
        other += list(head.parameters())
    optimizer = torch.optim.AdamW([
        {"params": encoder_params, "lr_scale": config.encoder_lr_scale},
        {"params": other, "lr_scale": 1.0},
    ], lr=config.lr, weight_decay=config.weight_decay)
    schedule = OptimConfig(name="adamw", lr=config.lr, final_lr=config.lr * 0.01, warmup_steps=config.warmup_steps)
    pos_weight = None
    if task.kind != "segmentation":
        positives = train.targets.sum(0)
        pos_weight = ((len(train) - positives) / positives.clamp_min(1)).clamp(1.0, 20.0).to(device)
    on_gpu = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda", enabled=on_gpu and config.amp == "fp16")
    generator = torch.Generator().manual_seed(config.seed)
    best_metric, best_step, best_state = -math.inf, 0, None
    curve: list[tuple[int, float]] = []
    losses: list[float] = []
    stale = 0
    started = time.perf_counter()
    if len(train) < 2:
        raise ValueError(f"{len(train)} training sample(s): too few to finetune (batch norm needs two)")
    batch_size = min(config.batch_size, len(train))  # a small labelled set still trains, in smaller batches
    step = 0
    while step < config.steps:
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            indices = order[start:start + batch_size]
            network.train()
            inputs = batch_inputs(train, indices, spec)
            masks = train.targets[indices] if task.kind == "segmentation" else None
            inputs, moved = _augment(inputs, masks, config, generator)
            targets = moved if moved is not None else train.targets[indices]
            lr = learning_rate(step, config.steps, config.lr, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = network(inputs.to(device))
                loss = _loss(task, logits, targets.to(device), pos_weight)
                if head is not None:
                    head.normalise_prototypes()
                    views = _hybrid_views(train, indices, multicrop, generator, 2 * spec.neighbours + 1)
                    _, scores = head(encode_crops(network.encoder, [v.to(device) for v in views]))  # type: ignore[arg-type]
                    swav_loss, _ = swav(list(scores.split(len(indices))))
                    loss = loss + config.hybrid_weight * swav_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            step += 1
            metric = None
            if step % config.eval_every == 0 or step == config.steps:
                metric = validation_metric(task, val, predict(network, val, spec, device))
                curve.append((step, metric))
                if metric > best_metric:
                    best_metric, best_step, stale = metric, step, 0
                    best_state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
                    if checkpoint is not None:
                        _save_atomically(best_state, checkpoint)
                else:
                    stale += 1
            if progress is not None:
                progress(step, losses[-1], metric)
            if step >= config.steps or stale >= config.patience:
                break
        if stale >= config.patience:
            break
    if best_state is not None:
        network.load_state_dict(best_state)
    outputs = choose_thresholds(task, val, predict(network, val, spec, device), config)
    return FinetuneResult(network.cpu().eval(), best_metric, best_step, step, curve, outputs,
                          time.perf_counter() - started, losses)


def _save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def _hybrid_views(data: TaskData, indices: Sequence[int], multicrop: MultiCrop,
                  generator: torch.Generator, repeats: int) -> list[torch.Tensor]:
    per_sample = []
    for i in indices:
        pixels = data.images[i].numpy().astype(np.uint16)
        decoded = decode_hu(pixels) if data.encodings[i] == "hu" else decode_unit(pixels)
        per_sample.append(multicrop.views(torch.from_numpy(decoded), data.encodings[i], generator))
    # A 2.5D network reads 2n + 1 slices: its SwAV views are single slices, repeated to fill them.
    return [torch.stack([views[v] for views in per_sample]).repeat(1, repeats, 1, 1) for v in range(len(per_sample[0]))]


VOXEL_THRESHOLD = 0.5  # a segmentation's voxel probability at or above which the voxel is lesion


def choose_thresholds(task: TaskSpec, val: TaskData, probs: torch.Tensor, config: FinetuneConfig) -> list[OutputSpec]:
    """Each output as the card states it, decided on the validation split at study level.

    Per classification finding: Platt calibration of the study scores; an operating threshold
    (Youden's J on the calibrated scores) only where validation holds at least
    ``config.min_cases_for_threshold`` positives and as many negatives, since on fewer Youden's
    point lands at an extreme score by chance; and the call is made (``assessed``) only with a
    threshold and a validation AUC of at least ``config.finding_auc_gate``. A segmentation output
    keeps raw voxel probabilities (identity calibration) and the fixed voxel threshold.
    """
    truth = val.study_targets.numpy()
    if task.kind == "segmentation":
        positives = int(truth[:, 0].sum())
        return [OutputSpec(name=f.name, concept=f.concept, threshold=VOXEL_THRESHOLD,
                           threshold_rule=f"voxel probability {VOXEL_THRESHOLD:g}", positives=positives,
                           negatives=len(truth) - positives, assessed=True) for f in task.findings]
    scores = study_scores(task, val, probs).numpy()
    return [_assess(f.name, f.concept, truth[:, k], scores[:, k], config) for k, f in enumerate(task.findings)]


def _assess(name: str, concept: CodedConcept, truth: np.ndarray, scores: np.ndarray,
            config: FinetuneConfig) -> OutputSpec:
    """One finding's calibration, threshold and gate from its validation truth and study scores."""
    need = config.min_cases_for_threshold
    positives = int(truth.sum())
    negatives = len(truth) - positives
    calibration = fit_platt(truth, scores)
    auc = roc_auc(truth, scores) if positives and negatives else None  # calibration keeps the ranking
    threshold = None
    reason = ""
    if positives < need or negatives < need:
        short = " and ".join(f"{n} {kind}{'' if n == 1 else 's'}"
                             for n, kind in ((positives, "positive"), (negatives, "negative")) if n < need)
        reason = f"validation has {short}, at least {need} of each needed for a threshold"
    else:
        threshold = youden_threshold(truth, calibration.apply(scores))
        if auc is not None and auc < config.finding_auc_gate:
            reason = f"validation AUC {auc:.2f} < gate {config.finding_auc_gate:.2f}"
    return OutputSpec(
        name=name, concept=concept, calibration=calibration, threshold=threshold,
        threshold_rule=(f"Youden's J on calibrated validation study scores, only with at least {need} positive "
                        f"and {need} negative validation studies"),
        validation_auc=auc, positives=positives, negatives=negatives, assessed=not reason,
        not_assessed_reason=reason)


def headline_metric(task: TaskSpec) -> str:
    """The name of the validation metric early stopping and the model's gate use."""
    return "mean Dice" if task.kind == "segmentation" else "mean study AUC"


def model_gate(task: TaskSpec, config: FinetuneConfig) -> float:
    """The lowest validation headline metric at which the model is deployable (0: no gate)."""
    return config.dice_gate if task.kind == "segmentation" else config.finding_auc_gate


def deployability(task: TaskSpec, metric: float, config: FinetuneConfig) -> tuple[bool, str]:
    """Whether the model's validation headline metric passes its gate, and the sentence that says so.

    A model below its gate still registers (its card tells the admin why it is held back), but
    workers refuse it. A gate of 0 is off; an undefined metric (no validation finding with both
    classes) fails any other gate.
    """
    gate = model_gate(task, config)
    what = f"validation {headline_metric(task)}"
    if not math.isfinite(metric):
        return gate == 0, f"{what} undefined (no validation finding with both classes), " + (
            "not gated (gate 0)" if gate == 0 else f"gate {gate:.2f}")
    if gate == 0:
        return True, f"{what} {metric:.2f}, not gated (gate 0)"
    if metric < gate:
        return False, f"{what} {metric:.2f} < gate {gate:.2f}"
    return True, f"{what} {metric:.2f} >= gate {gate:.2f}"


def save_model(out: Path, task: TaskSpec, result: FinetuneResult, config: FinetuneConfig, *, name: str,
               version: str, training: dict[str, Any], encoder_source: dict[str, Any]) -> ModelCard:
    """Write ``model.safetensors`` and ``card.yaml`` (a fresh Device UID for this training)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.network.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    encoder_spec = result.network.encoder.spec  # type: ignore[union-attr]
    deployable, why = deployability(task, result.best_metric, config)
    card = ModelCard(
        name=name, version=version, task=task.name, kind=task.kind, description=task.description,
        applies_to=AppliesTo(modalities=task.modalities, body_parts=task.body_parts,
                             min_slices=8 if task.kind != "classification" else 1),
        encoder=encoder_spec, head_stride=config.head_stride if task.kind != "segmentation" else 4,
        input=config.input_for(task),
        input_channels=config.input_for(task).describe(ct="CT" in task.modalities),
        outputs=result.outputs, deployable=deployable, deployability=why,
        validation={"metric": headline_metric(task), "value": result.best_metric,
                    "gate": model_gate(task, config),
                    "best_step": result.best_step, "curve": result.curve},
        training={**training, "config": config.model_dump(mode="json"), "steps_run": result.steps_run,
                  "seconds": round(result.seconds, 1)},
        encoder_source=encoder_source, device_uid=new_device_uid(),
        sha256=sha256_of(out / WEIGHTS), created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_card(out, card)
    return card


def initial_encoder(init: str, config: FinetuneConfig, task: TaskSpec) -> tuple[Encoder, dict[str, Any]]:
    """``scratch`` or an exported encoder folder, refused if its architecture or channels differ from
    the task's input, or if its CT channels are other windows than the task's (a 3-channel encoder
    pretrained on soft-tissue/lung/bone would be fed brain/subdural/bone)."""
    spec = config.encoder_spec(task)
    if init == "scratch":
        return Encoder(spec), {"init": "scratch"}
    encoder, card = load_encoder(Path(init), expect=spec)
    wanted = config.input_for(task).window_pairs()
    pretrained = [tuple(pair) for pair in card.normalisation.ct_windows]
    if "CT" in task.modalities and spec.in_channels > 1 and pretrained and pretrained != wanted[:len(pretrained)]:
        raise ValueError(f"encoder {init} was pretrained with CT channels {pretrained}, the task reads {wanted}")
    return encoder, {"init": str(init), "sha256": card.sha256, "steps": card.steps,
                     "training_data": card.training_data}
