"""The prepared-shard format: what ``pacsnode pretrain prepare`` writes and the loader streams.

A shard folder holds ``shards.json`` (the manifest) and, per shard, ``shard-NNNNNN.npy`` (an
uncompressed ``uint16`` array of shape ``(n, size, size)``, memory-mapped by the reader so a
loader touches only the images it uses) and ``shard-NNNNNN.json`` (one record per image).

Pixels are stored in one of two encodings, named per record:

* ``hu`` (CT): Hounsfield units + 1024, clipped to ``[0, 65535]``; the window is chosen per
  view at training time (a window sampled per crop is one of the augmentations), so it cannot
  be fixed here.
* ``unit`` (every other modality): intensities already normalised to ``[0, 1]`` by the
  modality's rule (percentile scaling, MONOCHROME1 inverted), stored as ``round(x * 65535)``.

Two bytes per pixel at 256 x 256 is 128 KiB per image: 100 million images are ~12.5 TiB
(see the README's design note). The format has no torch in it: writing needs only numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_NAME = "shards.json"
HU_OFFSET = 1024
UNIT_SCALE = 65535
Encoding = Literal["hu", "unit"]


class SampleRecord(BaseModel):
    """One stored image: where it came from (UIDs, never patient identity) and how it is encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sop_uid: str
    study_uid: str
    series_uid: str
    frame: int = 0
    modality: str
    body_part: str = ""
    encoding: Encoding
    labels: dict[str, float] = Field(default_factory=dict)


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    count: int


class ShardManifest(BaseModel):
    """The folder's table of contents plus the summary an exported encoder's card repeats."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    size: int
    shards: list[ShardInfo] = Field(default_factory=list)
    modalities: dict[str, int] = Field(default_factory=dict)
    studies: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    settings: dict[str, object] = Field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(shard.count for shard in self.shards)


def encode_hu(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units to the stored ``hu`` encoding."""
    return np.clip(np.rint(hu + HU_OFFSET), 0, 65535).astype(np.uint16)


def encode_unit(values: np.ndarray) -> np.ndarray:
    """Intensities in ``[0, 1]`` to the stored ``unit`` encoding."""
    return np.rint(np.clip(values, 0.0, 1.0) * UNIT_SCALE).astype(np.uint16)


def decode_hu(stored: np.ndarray) -> np.ndarray:
    """Stored ``hu`` pixels back to Hounsfield units (float32)."""
    return stored.astype(np.float32) - HU_OFFSET


def decode_unit(stored: np.ndarray) -> np.ndarray:
    """Stored ``unit`` pixels back to ``[0, 1]`` (float32)."""
    return stored.astype(np.float32) / UNIT_SCALE


def write_json_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class ShardWriter:
    """Buffers images and writes a shard every ``shard_size`` of them; memory stays one shard.

    ``close`` writes the manifest last, so a folder with a manifest is complete; a run that
    dies leaves no manifest and the reader refuses the folder.
    """

    out_dir: Path
    size: int
    shard_size: int = 1024
    settings: dict[str, object] = field(default_factory=dict)
    _pixels: list[np.ndarray] = field(default_factory=list, init=False)
    _records: list[SampleRecord] = field(default_factory=list, init=False)
    _manifest: ShardManifest = field(init=False)
    _study_uids: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._manifest = ShardManifest(size=self.size, settings=dict(self.settings))

    def add(self, pixels: np.ndarray, record: SampleRecord) -> None:
        if pixels.shape != (self.size, self.size) or pixels.dtype != np.uint16:
            raise ValueError(
                f"pixels must be uint16 of shape {(self.size, self.size)}, got {pixels.dtype} {pixels.shape}"
            )
        self._pixels.append(pixels)
        self._records.append(record)
        self._manifest.modalities[record.modality] = self._manifest.modalities.get(record.modality, 0) + 1
        self._study_uids.add(record.study_uid)
        if len(self._pixels) >= self.shard_size:
            self._flush()

    def skip(self, reason: str, count: int = 1) -> None:
        """Count an image or file left out, by reason (the manifest reports them)."""
        self._manifest.skipped[reason] = self._manifest.skipped.get(reason, 0) + count

    def _flush(self) -> None:
        if not self._pixels:
            return
        name = f"shard-{len(self._manifest.shards):06d}"
        array_path = self.out_dir / f"{name}.npy"
        tmp = array_path.with_suffix(".npy.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, np.stack(self._pixels))
        os.replace(tmp, array_path)
        records = [record.model_dump() for record in self._records]
        write_json_atomically(self.out_dir / f"{name}.json", json.dumps(records))
        self._manifest.shards.append(ShardInfo(name=name, count=len(self._pixels)))
        self._pixels.clear()
        self._records.clear()

    def close(self) -> ShardManifest:
        self._flush()
        self._manifest.studies = len(self._study_uids)
        write_json_atomically(self.out_dir / MANIFEST_NAME, self._manifest.model_dump_json(indent=2))
        return self._manifest


class ShardSet:
    """Read access to a prepared folder: the manifest, and each shard's pixels and records."""

    def __init__(self, root: Path) -> None:
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{root} holds no {MANIFEST_NAME}: not a prepared shard folder, or prepare did not finish"
            )
        self.root = root
        self.manifest = ShardManifest.model_validate_json(manifest_path.read_text())
        if self.manifest.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{root}: shard format {self.manifest.format_version}, this version reads {FORMAT_VERSION}"
            )

    def __len__(self) -> int:
        return self.manifest.total

    def pixels(self, shard: int) -> np.ndarray:
        """The shard's ``(n, size, size)`` array, memory-mapped (pages load on first touch)."""
        name = self.manifest.shards[shard].name
        return np.load(self.root / f"{name}.npy", mmap_mode="r")

    def records(self, shard: int) -> list[SampleRecord]:
        name = self.manifest.shards[shard].name
        raw = json.loads((self.root / f"{name}.json").read_text())
        return [SampleRecord.model_validate(item) for item in raw]

    def iter_images(self) -> Iterator[tuple[np.ndarray, SampleRecord]]:
        for shard in range(len(self.manifest.shards)):
            pixels = self.pixels(shard)
            for index, record in enumerate(self.records(shard)):
                yield np.asarray(pixels[index]), record
