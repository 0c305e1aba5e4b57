"""Where the model registry keeps a model version: ``<models_dir>/<name>/<version>/`` holding
``card.yaml`` and ``model.safetensors``.

This is the one part of the registry the node needs too (to warn about a routed pipeline without
an installed model) and it must not import ``models``, which brings torch.
"""

from __future__ import annotations

from pathlib import Path

CARD = "card.yaml"
WEIGHTS = "model.safetensors"


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def installed_versions(models_dir: Path, name: str) -> list[str]:
    """The registered versions of model ``name``, oldest first (numbers in numeric order)."""
    folder = models_dir / name
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and (p / CARD).is_file()]
    return sorted(found, key=_version_key)
