"""The Part 10 prefix (preamble, ``DICM``, File Meta Information) of a received C-STORE data set,
the same bytes as pynetdicom's ``Event.encoded_dataset()`` puts in front, built once per kind.

pynetdicom builds a pydicom ``FileMetaDataset`` and encodes it for every instance, about 0.45 ms
of a 512x512 CT slice's handling. Within one series only the SOP Instance UID changes, so the
prefix is encoded by pynetdicom/pydicom once per (SOP class, transfer syntax, UID length), with a
placeholder UID of that length, and each instance's UID is put in its place. A UID of the same
length pads the same way and leaves every group length as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

PREAMBLE = b"\x00" * 128 + b"DICM"
TEMPLATES = 256  # kinds kept: SOP classes x transfer syntaxes x UID lengths seen lately


def _encoded(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """What pynetdicom's ``Event.encoded_dataset()`` puts in front of the data set."""
    return PREAMBLE + encode_file_meta(create_file_meta(
        sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid),
        transfer_syntax=UID(transfer_syntax_uid)))


@lru_cache(maxsize=TEMPLATES)
def _template(sop_class_uid: str, transfer_syntax_uid: str, uid_length: int) -> tuple[bytes, bytes] | None:
    """(before, after) the SOP Instance UID's value; None when the placeholder is ambiguous."""
    placeholder = "9" * uid_length
    encoded = _encoded(sop_class_uid, placeholder, transfer_syntax_uid)
    parts = encoded.split(placeholder.encode("ascii"))
    if len(parts) != 2:  # the placeholder also occurs in the class or transfer syntax UID
        return None
    return parts[0], parts[1]


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information for a data set received as a C-STORE."""
    template = _template(sop_class_uid, transfer_syntax_uid, len(sop_instance_uid)) if sop_instance_uid.isascii() else None
    if template is None:
        return _encoded(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
    before, after = template
    return before + sop_instance_uid.encode("ascii") + after


@dataclass(frozen=True)
class ReceivedFile:
    """A C-STORE's instance as its Part 10 file in two parts: the file meta the node built
    (``prefix``, preamble included) and the data set exactly as received, in ``transfer_syntax``.
    Kept apart, where gluing them copied the data set once more (514 KB for a CT slice): the
    store writes the parts one after the other, the header is read from the data set alone."""

    prefix: bytes
    data_set: bytes
    transfer_syntax: str

    @property
    def parts(self) -> tuple[bytes, bytes]:
        return self.prefix, self.data_set
