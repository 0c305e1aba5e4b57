"""Deterministic UIDs for result objects.

A redelivered task must rebuild byte-identical objects, so no UID of a result may come from a
random source: every one is derived from what identifies the run (study, study version, model
name and version) plus the role of the UID in the result set ("sr", "seg-series", ...). A new
study version or model version changes every input and therefore every UID, which is what lets a
PACS keep the superseded objects beside the new ones.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from pydicom.uid import generate_uid

UUID_ROOT = "2.25"
MAX_ROOT_LENGTH = 53  # pydicom allows a 54-character prefix, which includes the trailing dot
_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Namespace of the name-based UUIDs under 2.25: fixed, so that the same inputs give the same UID.
_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-5b8f-9a41-7c2e0d4b8e10")


def check_uid_root(uid_root: str) -> str:
    """Return ``uid_root`` if it can prefix result UIDs, else raise naming the argument."""
    if uid_root != UUID_ROOT and (len(uid_root) > MAX_ROOT_LENGTH or not _ROOT.match(uid_root)):
        raise ValueError(
            f"uid_root {uid_root!r} is not a UID root of at most {MAX_ROOT_LENGTH} characters "
            "(digits and dots, no leading zeros) nor '2.25'"
        )
    return uid_root


def _entropy(parts: tuple[str, ...]) -> list[str]:
    # Length-prefixed so that ("1", "2x") and ("12", "x") never hash alike.
    return [f"{len(part)}:{part};" for part in parts]


def result_uid(
    uid_root: str, study_uid: str, version: int, model_name: str, model_version: str, role: str
) -> str:
    """The UID playing ``role`` among the results of one (study version, model version).

    Under the ``2.25`` root the UID is a name-based (SHA-1, RFC 4122 version 5) UUID as an integer:
    pydicom's ``generate_uid(prefix=None)`` ignores ``entropy_srcs`` and returns a random UUID, so it
    cannot be used there. Under another root pydicom hashes the inputs (SHA-512) after the root.
    """
    parts = (study_uid, str(version), model_name, model_version, role)
    if check_uid_root(uid_root) == UUID_ROOT:
        return f"{UUID_ROOT}.{uuid.uuid5(_NAMESPACE, ''.join(_entropy(parts))).int}"
    return str(generate_uid(prefix=uid_root + ".", entropy_srcs=_entropy(parts)))


@dataclass(frozen=True)
class RunUids:
    """The UIDs of one (study version, model version): ``uid(role)`` for each object and item."""

    uid_root: str
    study_uid: str
    version: int
    model_name: str
    model_version: str

    def uid(self, role: str) -> str:
        return result_uid(self.uid_root, self.study_uid, self.version, self.model_name, self.model_version, role)
