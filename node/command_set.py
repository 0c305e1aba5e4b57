"""The two DIMSE command sets every received instance costs: the C-STORE-RQ read and the
C-STORE-RSP sent, coded directly (PS3.7 E.1: Implicit VR Little Endian, group 0000).

pynetdicom reads a command set into a pydicom Dataset, converts each element through pydicom
and sets it on the primitive, and writes a response by building a Dataset and encoding it twice.
On a 512x512 CT slice that was about a fifth of the receivers' Python time
(``python -m bench.ingest --profile``). Only the plain forms are coded here; anything else
(another element, a value of more than one item, an error comment) gives None and the caller
leaves the message to pynetdicom, so nothing pynetdicom accepts or refuses is judged otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.multival import MultiValue
from pydicom.values import convert_AE_string, convert_UI
from pynetdicom.dimse_primitives import C_STORE

_TAG_LENGTH = struct.Struct("<HHI")  # group, element, value length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
C_STORE_RQ_COMMAND = 0x0001
C_STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101

# The elements a C-STORE-RQ may carry (PS3.7 9.3.1.1), by element number in group 0000.
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
AFFECTED_SOP_INSTANCE = 0x1000
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031
_US_ELEMENTS = frozenset({COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE, MOVE_ORIGINATOR_ID})
_REQUIRED = frozenset({AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE,
                       AFFECTED_SOP_INSTANCE})


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ command set, as pydicom converts its values."""

    message_id: int
    priority: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae: str | None
    move_originator_id: int | None

    def primitive(self, data_set: Any) -> C_STORE:
        """The C-STORE indication pynetdicom hands its service class, set through the primitive's
        own (validating) setters, as ``DIMSEMessage.message_to_primitive`` sets them."""
        primitive = C_STORE()
        primitive.MessageID = self.message_id
        primitive.Priority = self.priority
        primitive.AffectedSOPClassUID = self.sop_class_uid
        primitive.AffectedSOPInstanceUID = self.sop_instance_uid
        if self.move_originator_ae is not None:
            primitive.MoveOriginatorApplicationEntityTitle = self.move_originator_ae
        if self.move_originator_id is not None:
            primitive.MoveOriginatorMessageID = self.move_originator_id
        primitive.DataSet = data_set
        return primitive


def decode_store_request(command: bytes | memoryview) -> StoreRequest | None:
    """The C-STORE-RQ whose command set (with a data set to follow) is ``command``; None for any
    other message, or for anything beyond the plain form: pynetdicom then reads it."""
    values: dict[int, bytes | memoryview] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < _TAG_LENGTH.size:
            return None
        group, element, length = _TAG_LENGTH.unpack_from(command, offset)
        offset += _TAG_LENGTH.size
        if group != 0 or element in values or length > end - offset:
            return None
        values[element] = command[offset:offset + length]
        offset += length
    if not _REQUIRED <= values.keys() or not values.keys() <= _REQUIRED | {
            GROUP_LENGTH, MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID}:
        return None
    if any(len(values[e]) != _US.size for e in _US_ELEMENTS & values.keys()):
        return None
    if GROUP_LENGTH in values and (len(values[GROUP_LENGTH]) != _UL.size
                                   or _UL.unpack(values[GROUP_LENGTH])[0] != end - _TAG_LENGTH.size - _UL.size):
        return None
    numbers = {e: _US.unpack(values[e])[0] for e in _US_ELEMENTS & values.keys()}
    if numbers[COMMAND_FIELD] != C_STORE_RQ_COMMAND or numbers[DATA_SET_TYPE] == NO_DATA_SET:
        return None
    sop_class = convert_UI(bytes(values[AFFECTED_SOP_CLASS]), True)
    sop_instance = convert_UI(bytes(values[AFFECTED_SOP_INSTANCE]), True)
    move_ae = convert_AE_string(bytes(values[MOVE_ORIGINATOR_AE]), True) if MOVE_ORIGINATOR_AE in values else None
    if any(isinstance(text, MultiValue) for text in (sop_class, sop_instance, move_ae)):
        return None
    return StoreRequest(
        message_id=numbers[MESSAGE_ID], priority=numbers[PRIORITY],
        sop_class_uid=str(sop_class), sop_instance_uid=str(sop_instance),
        move_originator_ae=None if move_ae is None else str(move_ae),
        move_originator_id=numbers.get(MOVE_ORIGINATOR_ID),
    )


def _element(tag: int, value: bytes) -> bytes:
    return _TAG_LENGTH.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded


def store_response_command(primitive: Any) -> bytes | None:
    """The encoded command set of a plain C-STORE response (status, no comment); None otherwise."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if primitive.Status is None or primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None:
        return None
    body = b"".join((
        _element(AFFECTED_SOP_CLASS, _uid(str(primitive.AffectedSOPClassUID))),
        _element(COMMAND_FIELD, _US.pack(C_STORE_RSP_COMMAND)),
        _element(0x0120, _US.pack(int(primitive.MessageIDBeingRespondedTo))),  # Message ID Being Responded To
        _element(DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(0x0900, _US.pack(int(primitive.Status))),  # Status
        _element(AFFECTED_SOP_INSTANCE, _uid(str(primitive.AffectedSOPInstanceUID))),
    ))
    return _element(GROUP_LENGTH, _UL.pack(len(body))) + body
