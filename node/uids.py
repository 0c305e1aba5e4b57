"""DICOM UID grammar (PS3.5 9.1): the only values from a dataset that ever become path parts."""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a well-formed UID: dotted numeric components, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


class InvalidUID(ValueError):
    """A dataset carried a missing or malformed UID; it names the attribute."""

    def __init__(self, keyword: str, value: object) -> None:
        super().__init__(f"{keyword} is missing or not a valid UID")
        self.keyword = keyword
        self.value = value
