"""Everything random or unique in the output derives from the seed through these two functions.

The same ``generate`` call must give byte-identical files, so nothing may come from the clock,
``uuid4`` or Python's salted ``hash``: UIDs are 2.25 UIDs hashed from a path of names, and every
random stream is a numpy Generator seeded from the same kind of path. Streams are keyed by what
they are for (patient anatomy, study findings, noise), so one study's data do not depend on how
many other studies a run makes.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np

NAMESPACE = "pacsnode-synth/1"
# Name-based (SHA-1, version 5) UUIDs live under this namespace UUID, itself name-based.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:synth")


def _key(parts: tuple[object, ...]) -> str:
    # An explicit separator: pydicom joins entropy sources with "", so ("a", "bc") == ("ab", "c").
    return "\x1f".join([NAMESPACE, *(str(part) for part in parts)])


def derive_uid(*parts: object) -> str:
    """A 2.25 UID (PS3.5 B.2: the integer of a UUID, at most 44 characters) from ``parts`` only.

    Built from a name-based UUID rather than ``pydicom.uid.generate_uid``: with ``prefix=None``
    pydicom 3.0 ignores ``entropy_srcs`` and returns a random UUID.
    """
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, _key(parts)).int}"


def derive_rng(*parts: object) -> np.random.Generator:
    """A numpy random Generator that depends only on ``parts``."""
    digest = hashlib.sha256(_key(parts).encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "little")))
