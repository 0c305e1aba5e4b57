"""``prepare`` on many hosts at once: deterministic partitions any scheduler can run, and a merge.

``--part K/N`` keeps the studies whose UID hashes to ``K`` of ``N`` (SHA-256, so every host agrees
without talking to the others), so a SLURM array, a Kubernetes indexed job or a shell loop runs
parts 1..N side by side, each writing its own shard folder on the shared store. Whole studies go
to one part: the parts' study counts add up and no study is split across folders.

``merge`` writes a manifest that lists every part's shards by relative path (nothing is copied);
training reads the merged folder like any other. The parts must agree on every setting but their
part, or the merge refuses them.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.shards import MANIFEST_NAME, ShardInfo, ShardManifest, ShardSet, write_json_atomically

PART = re.compile(r"^(\d+)/(\d+)$")
# Settings that differ between the parts of one preparation by design.
PER_PART_SETTINGS = ("part", "index")


@dataclass(frozen=True)
class Part:
    """Part ``number`` of ``count`` (1-based, as an array job's task IDs usually are)."""

    number: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        match = PART.match(text.strip())
        if match is None or not 1 <= int(match[1]) <= int(match[2]):
            raise ValueError(f"--part {text!r}: expected K/N with 1 <= K <= N, e.g. 1/4")
        return cls(int(match[1]), int(match[2]))

    def owns(self, study_uid: str) -> bool:
        digest = hashlib.sha256(study_uid.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.number - 1

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def merge_parts(parts: list[Path], out: Path) -> ShardManifest:
    """One manifest in ``out`` over the shards of every part folder (paths relative to ``out``)."""
    if not parts:
        raise ValueError("merge: name at least one part folder")
    sets = [ShardSet(folder) for folder in parts]
    first = sets[0].manifest
    shared = {k: v for k, v in first.settings.items() if k not in PER_PART_SETTINGS}
    seen: dict[str, Path] = {}
    for folder, shard_set in zip(parts, sets, strict=True):
        settings = {k: v for k, v in shard_set.manifest.settings.items() if k not in PER_PART_SETTINGS}
        if settings != shared or shard_set.manifest.size != first.size:
            raise ValueError(f"merge: {folder} was prepared with other settings than {parts[0]}")
        part = str(shard_set.manifest.settings.get("part"))
        if shard_set.manifest.settings.get("part") is None:
            raise ValueError(f"merge: {folder} was not prepared with --part K/N")
        if part in seen:
            raise ValueError(f"merge: {folder} and {seen[part]} are both part {part}")
        seen[part] = folder
    out.mkdir(parents=True, exist_ok=True)
    merged = ShardManifest(size=first.size, settings={**shared, "parts": [str(p) for p in parts]})
    for folder, shard_set in zip(parts, sets, strict=True):
        prefix = os.path.relpath(folder.resolve(), out.resolve())
        manifest = shard_set.manifest
        merged.shards.extend(ShardInfo(name=f"{prefix}/{s.name}", count=s.count) for s in manifest.shards)
        merged.studies += manifest.studies
        for modality, count in manifest.modalities.items():
            merged.modalities[modality] = merged.modalities.get(modality, 0) + count
        for reason, count in manifest.skipped.items():
            merged.skipped[reason] = merged.skipped.get(reason, 0) + count
    write_json_atomically(out / MANIFEST_NAME, merged.model_dump_json(indent=2))
    return merged
