"""The model registry: ``<models_dir>/<name>/<version>/`` folders of weights and card.

A version folder is immutable once registered (copied in under a temporary name, then renamed), so
a worker that loaded ``name@3`` keeps meaning the same weights. ``name`` alone resolves to the
highest version. The model name defaults to the task name, which is the pipeline name routing uses.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from config.registry_layout import WEIGHTS, installed_versions
from models.card import ModelCard, read_card
from models.networks import task_network
from pretrain.backbones import Encoder
from pretrain.export import sha256_of


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, _, version = text.partition("@")
        if not name or "/" in name or (version and "/" in version):
            raise ValueError(f"model reference {text!r}: expected NAME or NAME@VERSION")
        return cls(name, version or None)


def list_models(root: Path) -> list[ModelCard]:
    """Every registered version's card, by name then version."""
    if not root.is_dir():
        return []
    return [read_card(root / name.name / v) for name in sorted(root.iterdir()) if name.is_dir()
            for v in installed_versions(root, name.name)]


def resolve(root: Path, ref: str) -> Path:
    """The folder of ``NAME[@VERSION]``; the highest version when none is given."""
    parsed = ModelRef.parse(ref)
    known = installed_versions(root, parsed.name)
    if not known:
        raise LookupError(f"no model {parsed.name!r} in {root}")
    version = parsed.version or known[-1]
    if version not in known:
        raise LookupError(f"model {parsed.name!r} has no version {version!r}; registered: {', '.join(known)}")
    return root / parsed.name / version


def verify(folder: Path) -> ModelCard:
    """The card of a model folder whose weights match the card's SHA-256."""
    card = read_card(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS}")
    if sha256_of(weights) != card.sha256:
        raise ValueError(f"{weights} does not match the SHA-256 in its card: altered or truncated")
    return card


def register(root: Path, source: Path) -> Path:
    """Copy a finetuned model folder into the registry as ``<name>/<version>`` (refusing overwrites)."""
    card = verify(source)
    target = root / card.name / card.version
    if target.exists():
        raise FileExistsError(f"{card.name}@{card.version} is already registered at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{card.version}.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    os.replace(staging, target)
    return target


def next_version(root: Path, name: str) -> str:
    numeric = [int(v) for v in installed_versions(root, name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def build_network(card: ModelCard) -> nn.Module:
    """The untrained network a card describes (weights are loaded by :func:`load_model`)."""
    return task_network(card.kind, Encoder(card.encoder), len(card.outputs), card.head_stride)


def load_model(folder: Path) -> tuple[nn.Module, ModelCard]:
    """A verified model version, in eval mode."""
    card = verify(folder)
    network = build_network(card)
    network.load_state_dict(load_file(str(folder / WEIGHTS)))
    return network.eval(), card
