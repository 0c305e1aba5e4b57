"""The pretraining recipe: one strict YAML file (default ``config/pretrain.yaml``), validated up front.

Defaults follow SwAV's reference where the archive allows (3000 prototypes, epsilon 0.05, three
Sinkhorn iterations, temperature 0.1, 2 global + 6 local crops, LARS with warm-up and cosine decay,
prototypes frozen for the first iterations); the learning rate is given for a global batch of 256
and scaled linearly with the real global batch, as in the paper's recipe.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pretrain.augment import AugmentConfig, CropSpec
from pretrain.backbones import EncoderSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    encoder: EncoderSpec = EncoderSpec()
    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)
    prototypes: int = Field(3000, ge=2)


class SwAVConfig(_Strict):
    temperature: float = Field(0.1, gt=0)
    epsilon: float = Field(0.05, gt=0)
    sinkhorn_iterations: int = Field(3, ge=1)
    assign_crops: list[int] = Field(default_factory=lambda: [0, 1])
    freeze_prototypes_steps: int = Field(313, ge=0)
    queue_length: int = Field(0, ge=0, description="Per-rank queue length; 0 disables the queue.")
    queue_start_epoch: int = Field(15, ge=0)


class OptimConfig(_Strict):
    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = Field(0.6, gt=0, description="Peak learning rate for a global batch of 256.")
    final_lr: float = Field(0.0006, ge=0)
    warmup_steps: int = Field(500, ge=0)
    start_warmup_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lars_eta: float = Field(0.001, gt=0)


class SupervisedConfig(_Strict):
    """The paper's optional supervision: a BCE term on shard labels, where a sample has them."""

    labels: list[str] = Field(default_factory=list)
    weight: float = Field(0.0, ge=0)


class RunConfig(_Strict):
    seed: int = 0
    batch_size: int = Field(64, ge=2, description="Per rank.")
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (the schedule still spans the epochs).")
    loader_workers: int = Field(6, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    sync_batchnorm: bool = False
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (under torchrun, LOCAL_RANK picks N).")
    mix_shards: int = Field(4, ge=1, description="Shards shuffled together; more mixes better, costs memory.")
    tensorboard: bool = False


class PretrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    crops: list[CropSpec] = Field(
        default_factory=lambda: [
            CropSpec(size=224, count=2, scale=(0.14, 1.0)),
            CropSpec(size=96, count=6, scale=(0.05, 0.14)),
        ]
    )
    augment: AugmentConfig = AugmentConfig()
    swav: SwAVConfig = SwAVConfig()
    optim: OptimConfig = OptimConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        views = sum(crop.count for crop in self.crops)
        if views < 2:
            raise ValueError("crops: need at least two views in all")
        bad = [c for c in self.swav.assign_crops if not 0 <= c < views]
        if bad or not self.swav.assign_crops:
            raise ValueError(f"swav.assign_crops must index the {views} views, got {self.swav.assign_crops}")
        if self.crops[0].count < max(self.swav.assign_crops) + 1 and len(self.crops) > 1:
            raise ValueError("swav.assign_crops must be global crops (the first crop spec)")
        if self.supervised.weight > 0 and not self.supervised.labels:
            raise ValueError("supervised.weight > 0 needs supervised.labels")
        return self

    @property
    def global_crops(self) -> int:
        return self.crops[0].count

    @property
    def views(self) -> int:
        return sum(crop.count for crop in self.crops)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The shipped recipe, or ``path``'s, with ``overrides`` (nested dicts) merged on top."""
    text = path.read_text() if path else resources.files("config").joinpath("pretrain.yaml").read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path or 'config/pretrain.yaml'}: expected a mapping at the top level")
    return PretrainConfig.model_validate(merge_overrides(data, overrides or {}))


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_overrides(out[key], value) if nested else value
    return out
