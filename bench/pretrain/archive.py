"""The benchmark's phantom archive: synth CT and MR slices plus radiographs, in several transfer syntaxes.

Real archives are not all Explicit VR Little Endian: decoding JPEG-LS or JPEG 2000 costs several
times what copying raw pixels does, and that cost is exactly what prepared shards take off the
training path. So the synth studies (``node.synth.generate``, all written uncompressed) are
re-encoded series by series, round-robin per modality over ``ArchiveSpec.syntaxes`` (a series
keeps one syntax, as a modality writes it). Lossless syntaxes only, so every syntax decodes to the
same pixels and the per-syntax figures differ by decoding cost alone.

Generated once into ``bench/.cache/`` (gitignored) under a name derived from the spec; an
``archive.json`` written last marks a complete archive, so an interrupted run regenerates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

MARKER = "archive.json"
ARCHIVE_VERSION = 1  # bump when the layout or the re-encoding changes, so caches are rebuilt
SYNTAXES: Mapping[str, UID] = MappingProxyType({
    "explicit-le": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
})
UNCOMPRESSED = "explicit-le"


@dataclass(frozen=True)
class ArchiveSpec:
    """What the archive holds: ``studies`` CT and MR studies of ``slices`` slices, ``radiographs`` DX."""

    studies: int = 4
    slices: int = 32
    radiographs: int = 64
    size: int = 512
    seed: int = 11
    syntaxes: tuple[str, ...] = tuple(SYNTAXES)

    def __post_init__(self) -> None:
        unknown = [name for name in self.syntaxes if name not in SYNTAXES]
        if unknown or not self.syntaxes:
            raise ValueError(f"unknown transfer syntaxes {unknown}; choose from {', '.join(SYNTAXES)}")

    @property
    def key(self) -> str:
        """Cache folder name: every field that changes the files, plus the layout version."""
        text = json.dumps({**asdict(self), "version": ARCHIVE_VERSION}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        return (f"pretrain-archive-{self.studies}x{self.slices}-dx{self.radiographs}-{self.size}px-"
                f"seed{self.seed}-{digest}")


@dataclass(frozen=True)
class Archive:
    """A complete phantom archive: its folder and, per image file, modality and transfer syntax."""

    root: Path
    spec: ArchiveSpec
    syntax: Mapping[str, str]  # absolute path of each image file -> syntax name
    modality: Mapping[str, str]  # absolute path -> Modality
    files: int  # every file under root (images, SEG objects, label tables)
    image_bytes: int
    generated_s: float | None  # None when taken from the cache

    def summary(self) -> dict[str, object]:
        per_syntax: dict[str, int] = {}
        per_modality: dict[str, int] = {}
        for path, name in self.syntax.items():
            per_syntax[name] = per_syntax.get(name, 0) + 1
            per_modality[self.modality[path]] = per_modality.get(self.modality[path], 0) + 1
        return {
            "root": str(self.root),
            "spec": asdict(self.spec),
            "image_files": len(self.syntax),
            "all_files": self.files,
            "image_mb": round(self.image_bytes / 1e6, 1),
            "per_syntax": dict(sorted(per_syntax.items())),
            "per_modality": dict(sorted(per_modality.items())),
            "generated_s": None if self.generated_s is None else round(self.generated_s, 1),
        }


def _generate(root: Path, spec: ArchiveSpec) -> None:
    """CT + MR studies in ``ct-mr/``, radiographs in ``dx/`` (two runs: one DX per study otherwise)."""
    from node.synth import generate

    workers = max(1, min(os.cpu_count() or 1, 4))
    generate(root / "ct-mr", spec.studies, ["ct-head", "mr-brain"], spec.seed, ct_slices=spec.slices,
             mr_slices=spec.slices, ct_size=spec.size, mr_size=spec.size, workers=workers)
    if spec.radiographs:
        generate(root / "dx", spec.radiographs, "cxr", spec.seed + 1, cxr_size=spec.size, workers=workers)


def _images(root: Path) -> dict[str, tuple[str, str]]:
    """Image files (not SEG) below ``root``: path -> (modality, series UID)."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["Modality", "SeriesInstanceUID"])
        modality = str(header.get("Modality", ""))
        if modality and modality != "SEG":
            found[str(path)] = (modality, str(header.get("SeriesInstanceUID", "")))
    return found


def _assign_syntaxes(images: Mapping[str, tuple[str, str]], syntaxes: tuple[str, ...]) -> dict[str, str]:
    """Round-robin over syntaxes per modality, by series, so each syntax gets every modality."""
    series_by_modality: dict[str, list[str]] = {}
    for modality, series in images.values():
        if series not in series_by_modality.setdefault(modality, []):
            series_by_modality[modality].append(series)
    chosen: dict[str, str] = {}
    for series_list in series_by_modality.values():
        for position, series in enumerate(sorted(series_list)):
            chosen[series] = syntaxes[position % len(syntaxes)]
    return {path: chosen[series] for path, (_, series) in images.items()}


def _reencode(path: Path, syntax: str) -> None:
    """Re-write ``path`` losslessly in ``syntax`` (through a temp file, so a crash leaves no half file)."""
    if SYNTAXES[syntax] == ExplicitVRLittleEndian:
        return
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(SYNTAXES[syntax])
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def prepare_archive(cache: Path, spec: ArchiveSpec) -> Archive:
    """The archive for ``spec``, generated and re-encoded on first use, then reused from ``cache``."""
    root = cache / spec.key
    marker = root / MARKER
    generated_s: float | None = None
    if not marker.is_file():
        if root.exists():
            shutil.rmtree(root)
        print(f"generating the phantom archive into {root} (once; cached) ...", flush=True)
        started = time.perf_counter()
        _generate(root, spec)
        images = _images(root)
        syntax = _assign_syntaxes(images, spec.syntaxes)
        for path, name in syntax.items():
            _reencode(Path(path), name)
        relative = {str(Path(p).relative_to(root)): (images[p][0], syntax[p]) for p in syntax}
        generated_s = time.perf_counter() - started
        marker.write_text(json.dumps({"spec": asdict(spec), "version": ARCHIVE_VERSION,
                                      "images": relative}, indent=1))
    data = json.loads(marker.read_text())
    entries: dict[str, list[str]] = data["images"]
    syntax_of = {str(root / rel): entry[1] for rel, entry in entries.items()}
    modality_of = {str(root / rel): entry[0] for rel, entry in entries.items()}
    missing = [p for p in syntax_of if not Path(p).is_file()]
    if missing:
        marker.unlink()
        return prepare_archive(cache, spec)
    files = sum(1 for p in root.rglob("*") if p.is_file() and p.name != MARKER)
    return Archive(root=root, spec=spec, syntax=MappingProxyType(syntax_of),
                   modality=MappingProxyType(modality_of), files=files,
                   image_bytes=sum(Path(p).stat().st_size for p in syntax_of), generated_s=generated_s)
