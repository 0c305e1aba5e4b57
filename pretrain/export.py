"""Encoder export: weights (safetensors) plus a card, the hand-over from pretraining to finetuning.

An exported folder holds ``encoder.safetensors`` and ``encoder.yaml``. The card says what the
encoder expects (architecture, input channels and size, how each modality is normalised) so that
finetuning and inference feed it the same input, and where it came from (data summary, steps,
recipe), with the weights' SHA-256 so a copied or edited file is caught before use.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from pretrain import checkpoint
from pretrain.backbones import Encoder, EncoderSpec
from pretrain.config import PretrainConfig

CARD_FORMAT = "pacsnode-encoder/1"
WEIGHTS = "encoder.safetensors"
CARD = "encoder.yaml"


class Normalisation(BaseModel):
    """How stored pixels become network input, per modality (mirrors pretrain.decode and augment)."""

    model_config = ConfigDict(extra="forbid")

    ct: str = "Hounsfield units through fixed windows, one per input channel"
    ct_windows: list[tuple[float, float]] = Field(default_factory=list)
    other: str = "robust percentile scaling to [0, 1]; MONOCHROME1 inverted"
    size: int = Field(description="Images letterboxed to size x size at prepare time")


class EncoderCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = CARD_FORMAT
    encoder: EncoderSpec
    feature_dim: int
    input_size: int = Field(description="Global crop size used in pretraining")
    normalisation: Normalisation
    method: str = "SwAV (multi-crop, Sinkhorn-Knopp codes, swapped prediction)"
    steps: int
    global_batch: int
    recipe: dict[str, Any]
    training_data: dict[str, Any]
    sha256: str
    created: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_encoder(checkpoint_path: Path, out: Path) -> EncoderCard:
    """Write the encoder of a training checkpoint (file or run folder) and its card into ``out``."""
    if checkpoint_path.is_dir():
        checkpoint_path = checkpoint_path / checkpoint.CHECKPOINT
    state = checkpoint.load(checkpoint_path)
    config = PretrainConfig.model_validate(state["config"])
    prefix = "encoder."
    weights = {k[len(prefix):]: v.contiguous() for k, v in state["model"].items() if k.startswith(prefix)}
    encoder = Encoder(config.model.encoder)
    encoder.load_state_dict(weights)  # proves the weights fit the architecture before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS), metadata={"format": CARD_FORMAT, "arch": config.model.encoder.arch})
    shards = state["shards"]
    card = EncoderCard(
        encoder=config.model.encoder,
        feature_dim=encoder.feature_dim,
        input_size=config.crops[0].size,
        normalisation=Normalisation(
            ct_windows=config.augment.ct_windows[: config.model.encoder.in_channels], size=int(shards["size"])
        ),
        steps=int(state["step"]),
        global_batch=int(state["global_batch"]),
        recipe={"swav": config.swav.model_dump(mode="json"), "optim": config.optim.model_dump(mode="json"),
                "crops": [c.model_dump(mode="json") for c in config.crops],
                "prototypes": config.model.prototypes},
        training_data={k: shards[k] for k in ("modalities", "studies", "skipped", "settings")}
        | {"images": sum(shards["modalities"].values())},
        sha256=sha256_of(out / WEIGHTS),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    (out / CARD).write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    return card


def read_card(folder: Path) -> EncoderCard:
    path = folder / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CARD}: not an exported encoder")
    card = EncoderCard.model_validate(yaml.safe_load(path.read_text()))
    if card.format != CARD_FORMAT:
        raise ValueError(f"{path}: format {card.format!r}, this version reads {CARD_FORMAT!r}")
    return card


def load_encoder(folder: Path, expect: EncoderSpec | None = None) -> tuple[Encoder, EncoderCard]:
    """The exported encoder with its card; refuses altered weights or another input spec than ``expect``."""
    card = read_card(folder)
    if expect is not None and expect != card.encoder:
        raise ValueError(
            f"encoder {folder} is {card.encoder.arch} with {card.encoder.in_channels} input channel(s); "
            f"this model needs {expect.arch} with {expect.in_channels}"
        )
    weights_path = folder / WEIGHTS
    if sha256_of(weights_path) != card.sha256:
        raise ValueError(f"{weights_path} does not match the SHA-256 in its card: altered or truncated")
    encoder = Encoder(card.encoder)
    encoder.load_state_dict(load_file(str(weights_path)))
    return encoder, card
