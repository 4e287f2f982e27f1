"""The storage SOP classes and transfer syntaxes the node accepts.

pynetdicom, as acceptor, picks the first syntax in *our* list that the caller proposed for a
presentation context. Uncompressed comes first (a sender holding an uncompressed image must
never be pushed into compressing it lossily), then the lossless compressions, then lossy.
Whatever is negotiated, the bytes are stored as they came.
"""

from __future__ import annotations

from pydicom import uid

VERIFICATION = uid.UID("1.2.840.10008.1.1")

STORAGE_SOP_CLASSES: tuple[uid.UID, ...] = (
    uid.OphthalmicPhotography8BitImageStorage,
    uid.OphthalmicPhotography16BitImageStorage,
    uid.WideFieldOphthalmicPhotographyStereographicProjectionImageStorage,
    uid.WideFieldOphthalmicPhotography3DCoordinatesImageStorage,
    uid.VLPhotographicImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.OphthalmicTomographyImageStorage,
)

TRANSFER_SYNTAXES: tuple[uid.UID, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    uid.JPEGLossless,  # 1.2.840.10008.1.2.4.57
    uid.JPEG2000Lossless,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEG2000,
)


def is_implicit_vr(transfer_syntax: str) -> bool:
    """Only Implicit VR Little Endian is implicit among the accepted syntaxes."""
    return transfer_syntax == uid.ImplicitVRLittleEndian


def is_encapsulated(transfer_syntax: str) -> bool:
    """Whether the syntax carries pixel data encapsulated (compressed) rather than native."""
    return bool(uid.UID(transfer_syntax).is_encapsulated)
