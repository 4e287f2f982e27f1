"""Is a destination there? C-ECHO for a DIMSE destination, QIDO-RS for a DICOMweb one."""

from __future__ import annotations

from dicomnode.dispatch import dicomweb
from dicomnode.dispatch.sender import EchoOutcome, echo
from dicomnode.settings import DestinationSettings, DicomWebDestinationSettings, DispatchSettings


def check_destination(
    name: str, destination: DestinationSettings | DicomWebDestinationSettings, *,
    calling_ae: str, settings: DispatchSettings,
) -> EchoOutcome:
    if isinstance(destination, DestinationSettings):
        return echo(name, destination, calling_ae=calling_ae, settings=settings)
    return dicomweb.check(name, destination, timeout=settings.connect_timeout_seconds)


def describe(destination: DestinationSettings | DicomWebDestinationSettings) -> dict[str, str]:
    """How reports name a destination: AE title and address, or the DICOMweb URL."""
    if isinstance(destination, DestinationSettings):
        return {"ae_title": destination.ae_title,
                "address": f"{destination.host}:{destination.port}"}
    return {"ae_title": "", "address": destination.url}
