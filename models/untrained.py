"""Registered models with seeded random weights, for tests and benchmarks of the serving path.

An untrained network costs exactly what a trained one of the same architecture and input size
costs, and its outputs are deterministic functions of the seed: enough to test the flow
(selection, inference, DICOM results, delivery) and to time it, never to judge accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.card import OutputSpec
from models.finetune import FinetuneConfig, FinetuneResult, build_network, save_model
from models.registry import register
from models.tasks import task_spec, task_specs
from pretrain.backbones import Encoder


def install_untrained_models(models_dir: Path, tasks: tuple[str, ...] | None = None, size: int = 32,
                             seg_threshold: float = 0.5) -> None:
    """Register version 1 of each task's model (all tasks by default): a ResNet-18 encoder with
    seed-0 weights, the task's declared input at ``size`` px, operating thresholds 0.5
    (``seg_threshold`` for masks), uncalibrated, every finding assessed and the model deployable."""
    staging = models_dir.parent / ".staging-models"
    for task in tasks if tasks is not None else tuple(task_specs()):
        spec = task_spec(task)
        # Gates off: untrained models exist to exercise the serving path, every finding gets a call.
        config = FinetuneConfig(input=spec.input.model_copy(update={"size": size}), finding_auc_gate=0, dice_gate=0)
        torch.manual_seed(0)
        network = build_network(spec, Encoder(config.encoder_spec(spec)), config)
        threshold = seg_threshold if spec.kind == "segmentation" else 0.5
        outputs = [OutputSpec(name=f.name, concept=f.concept, threshold=threshold,
                              threshold_rule=f"fixed {threshold:g} (untrained test model)", assessed=True)
                   for f in spec.findings]
        result = FinetuneResult(network=network, best_metric=float("nan"), best_step=0, steps_run=0, curve=[],
                                outputs=outputs, seconds=0.0)
        folder = staging / task
        save_model(folder, spec, result, config, name=task, version="1",
                   training={"note": "untrained test model"}, encoder_source={"init": "scratch"})
        register(models_dir, folder)
