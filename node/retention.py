"""Retention: purge finished studies by age and disk use; never a study still in flight.

Finished means done, failed, not applicable or unmatched (``StudyState`` outside IN_FLIGHT),
with no result file still pending export (``node.exports``): a destination that is down keeps
its results in the store until they are sent or their export fails for good.
Processed studies go after ``processed_max_age_days``, unmatched ones after
``unmatched_max_age_days``; above ``max_disk_used_percent`` the oldest finished studies go
first until the estimate falls below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config.settings import RetentionSettings
from node.index import StudyIndex, StudyState
from node.store import StudyStore

DAY_S = 86400.0


@dataclass(frozen=True)
class PurgeItem:
    study_uid: str
    state: str
    why: str
    bytes: int
    updated_at: float


def plan_purge(index: StudyIndex, store: StudyStore, policy: RetentionSettings, now: float) -> list[PurgeItem]:
    finished = index.finished_studies_oldest_first()
    chosen: list[PurgeItem] = []
    kept = []
    for study in finished:
        limit = (policy.unmatched_max_age_days if study.state == StudyState.UNMATCHED.value
                 else policy.processed_max_age_days)
        if now - study.updated_at > limit * DAY_S:
            chosen.append(PurgeItem(study.study_uid, study.state, f"older than {limit:g} days", study.bytes,
                                    study.updated_at))
        else:
            kept.append(study)
    total, used = store.usage()
    excess = used - sum(item.bytes for item in chosen) - policy.max_disk_used_percent / 100.0 * total
    for study in kept:
        if excess <= 0:
            break
        chosen.append(PurgeItem(study.study_uid, study.state, f"disk above {policy.max_disk_used_percent:g}%",
                                study.bytes, study.updated_at))
        excess -= study.bytes
    return chosen


def apply_purge(index: StudyIndex, store: StudyStore, items: list[PurgeItem]) -> tuple[int, int]:
    """Purge the planned studies; returns (studies purged, bytes freed). Changed studies are skipped."""
    purged = freed = 0
    for item in items:
        retired: list[Path] = []

        def retire(study_uid: str = item.study_uid, into: list[Path] = retired) -> None:
            folder = store.retire_study(study_uid)
            if folder is not None:
                into.append(folder)

        if index.forget_study(item.study_uid, item.updated_at, retire):
            purged += 1
            freed += sum(store.delete_retired(folder) for folder in retired)
    return purged, freed
