"""The C-STORE response statuses this node returns (PS3.4 B.2.3 and PS3.7 C), in one place.

The README's "DIMSE statuses" table lists the same codes; keep the two in step.
"""

from __future__ import annotations

SUCCESS = 0x0000
# Refused: Out of Resources (A7xx): the storage volume is below `storage.min_free_mb`,
# or the write itself ran out of space.
OUT_OF_RESOURCES = 0xA700
# Error: Data Set does not match SOP Class (A9xx): SOP Class UID in the data set differs
# from the Affected SOP Class UID of the request.
SOP_CLASS_MISMATCH = 0xA900
# Error: Cannot understand (Cxxx).
UNPARSEABLE = 0xC210
MISSING_UID = 0xC220
MALFORMED_UID = 0xC221
SOP_INSTANCE_MISMATCH = 0xC222
# Failure: Duplicate SOP Instance (PS3.7 C.4, 0111H): the SOP Instance UID is already held
# under another study or series. Not idempotent (the content cannot be the same instance),
# so refused; a resend under the same study and series stays a success.
DUPLICATE_SOP_INSTANCE = 0x0111
# General processing failure (PS3.7 C.4): an unexpected error in the node; audited.
PROCESSING_FAILURE = 0x0110

DESCRIPTIONS: dict[int, str] = {
    SUCCESS: "stored (or already held: a repeated SOP Instance is idempotent)",
    OUT_OF_RESOURCES: "refused: storage below storage.min_free_mb, or the disk filled",
    SOP_CLASS_MISMATCH: "data set SOP Class UID differs from the request's",
    UNPARSEABLE: "data set cannot be parsed in the negotiated transfer syntax",
    MISSING_UID: "Study, Series, SOP Instance or SOP Class UID missing or empty",
    MALFORMED_UID: "a UID is not well formed (digits and dots, at most 64 characters)",
    SOP_INSTANCE_MISMATCH: "data set SOP Instance UID differs from the request's",
    DUPLICATE_SOP_INSTANCE: "SOP Instance UID already held under another study or series",
    PROCESSING_FAILURE: "unexpected error in the node (audited; the node keeps serving)",
}
