"""All result objects of one model run, built in dependency order (SEG before SR, SC before KO)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.messages import ResultKind
from workers.outcome import StudyOutcome
from workers.results.checks import check_outcome
from workers.results.context import ResultContext
from workers.results.key_objects import build_key_objects
from workers.results.seg import build_seg
from workers.results.sr import build_sr
from workers.results.summary import build_summary
from workers.results.uids import RunUids


@dataclass(frozen=True)
class ResultSet:
    """The objects of one (study version, model version); ``seg`` is ``None`` without lesions."""

    sr: Dataset
    seg: Dataset | None
    ko: Dataset
    sc: Dataset

    def all(self) -> list[tuple[ResultKind, Dataset]]:
        """Every object with its kind, each after those it references (SEG, SR, SC, KO).

        A PACS that checks references on arrival then already holds what an object points to.
        """
        objects: list[tuple[ResultKind, Dataset]] = [] if self.seg is None else [(ResultKind.SEG, self.seg)]
        objects.extend([(ResultKind.SR, self.sr), (ResultKind.SC, self.sc), (ResultKind.KO, self.ko)])
        return objects


def run_uids(outcome: StudyOutcome, context: ResultContext) -> RunUids:
    """The UID source of ``outcome``'s results: study, study version, model name and version."""
    return RunUids(context.uid_root, outcome.study_uid, outcome.version, outcome.card.name, outcome.card.version)


def build_results(
    outcome: StudyOutcome,
    context: ResultContext,
    *,
    previous: Sequence[Dataset] = (),
    fractional_seg: bool = False,
) -> ResultSet:
    """Encode ``outcome`` as SR, SEG (when there are lesions), KO and SC.

    ``previous`` are the SRs of earlier versions of the study, which the new SR supersedes
    (Predecessor Documents Sequence). The same outcome always gives byte-identical objects.
    Raises ``ValueError`` naming the offending field when ``outcome`` cannot be encoded.
    """
    check_outcome(outcome)
    uids = run_uids(outcome, context)
    seg = build_seg(outcome, context, uids, fractional=fractional_seg)
    sr = build_sr(outcome, context, uids, seg=seg, previous=previous)
    sc = build_summary(outcome, context, uids)
    ko = build_key_objects(outcome, context, uids, summary=sc)
    return ResultSet(sr=sr, seg=seg, ko=ko, sc=sc)
