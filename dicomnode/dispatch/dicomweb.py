"""DICOMweb destinations: STOW-RS to send result objects, QIDO-RS to check one (dicomweb-client).

A batch goes as one STOW-RS request. The answer (PS3.18 10.5.3) lists what was stored
(Referenced SOP Sequence) and what failed with a Failure Reason (Failed SOP Sequence), also
on `409 Conflict`, which some servers use when any instance failed; each object gets its own
outcome from it, so the outbox retries only what did not arrive. Credentials are read from
their files at each request (a rotated token is used at once) and never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.auth import HTTPBasicAuth

from dicomnode.dispatch.sender import EchoOutcome, StoreOutcome
from dicomnode.settings import DicomWebDestinationSettings

logger = logging.getLogger(__name__)


class CredentialsError(Exception):
    """A credential file named in the settings cannot be read."""


def _secret(path: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialsError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if not value:
        raise CredentialsError(f"{key}: {path} is empty")
    return value


def _session(destination: DicomWebDestinationSettings, name: str) -> requests.Session:
    session = requests.Session()
    verify = destination.tls_verify
    session.verify = str(verify) if isinstance(verify, Path) else verify
    auth = destination.auth
    if auth is not None and auth.bearer_token_file is not None:
        token = _secret(auth.bearer_token_file, f"destinations.{name}.auth.bearer_token_file")
        session.headers["Authorization"] = f"Bearer {token}"
    elif auth is not None and auth.basic is not None:
        password = _secret(auth.basic.password_file,
                           f"destinations.{name}.auth.basic.password_file")
        session.auth = HTTPBasicAuth(auth.basic.user, password)
    return session


def _client(destination: DicomWebDestinationSettings, name: str) -> DICOMwebClient:
    client = DICOMwebClient(destination.url.rstrip("/"), session=_session(destination, name),
                            timeout=destination.timeout_seconds)
    # The client's own retries (on any exception, with waits) would hide an outage inside
    # one pass; the outbox's backoff is the retry schedule.
    client.set_http_retry_params(retry=False)
    return client


def _answer(response: requests.Response | None) -> pydicom.Dataset | None:
    """The STOW-RS answer carried by an HTTP error (409, 4xx with a body), if readable."""
    if response is None or not response.content:
        return None
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _reasons(answer: pydicom.Dataset) -> tuple[set[str], dict[str, str]]:
    stored = {str(item.get("ReferencedSOPInstanceUID", ""))
              for item in answer.get("ReferencedSOPSequence", [])}
    failed: dict[str, str] = {}
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
            f"failure reason 0x{int(reason):04X}" if reason is not None else "failed")
    return stored, failed


def send_batch(
    name: str, destination: DicomWebDestinationSettings, items: Sequence[tuple[int, Path]]
) -> list[StoreOutcome]:
    """STOW-RS `items` ((key, path) pairs) in one request; one outcome per item."""
    where = f"{destination.url} (STOW-RS)"
    outcomes: list[StoreOutcome] = []
    datasets: list[tuple[int, pydicom.Dataset]] = []
    for key, path in items:
        try:
            datasets.append((key, pydicom.dcmread(path)))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            outcomes.append(StoreOutcome(key, False, f"cannot read {path}: {exc}"))
    if not datasets:
        return outcomes
    answer: pydicom.Dataset | None
    try:
        answer = _client(destination, name).store_instances([ds for _, ds in datasets])
    except CredentialsError as exc:
        return outcomes + [StoreOutcome(key, False, str(exc)) for key, _ in datasets]
    except requests.HTTPError as exc:
        answer = _answer(exc.response)
        if answer is None:
            code = exc.response.status_code if exc.response is not None else "?"
            why = f"{where} answered HTTP {code}"
            return outcomes + [StoreOutcome(key, False, why) for key, _ in datasets]
    except requests.RequestException as exc:
        why = f"could not reach {where}: {type(exc).__name__}: {exc}"[:500]
        return outcomes + [StoreOutcome(key, False, why) for key, _ in datasets]
    stored, failed = _reasons(answer)
    # An answer without a Referenced SOP Sequence (some servers send none on success) stores
    # everything it does not list as failed.
    for key, ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            outcomes.append(StoreOutcome(key, False, f"{where}: {failed[uid]}"))
        elif uid in stored or not stored:
            outcomes.append(StoreOutcome(key, True))
        else:
            outcomes.append(StoreOutcome(key, False, f"{where}: not in the answer"))
    return outcomes


def check(name: str, destination: DicomWebDestinationSettings, *,
          timeout: float | None = None) -> EchoOutcome:
    """QIDO-RS for one study: is the service there, and does it accept our credentials?"""
    where = f"{destination.url} (QIDO-RS)"
    started = time.monotonic()
    if timeout is not None:
        destination = destination.model_copy(update={"timeout_seconds": timeout})
    try:
        _client(destination, name).search_for_studies(limit=1)
    except CredentialsError as exc:
        return EchoOutcome(name, False, str(exc), time.monotonic() - started)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        return EchoOutcome(name, False, f"{where} answered HTTP {code}",
                           time.monotonic() - started)
    except requests.RequestException as exc:
        return EchoOutcome(name, False, f"could not reach {where}: {type(exc).__name__}",
                           time.monotonic() - started)
    return EchoOutcome(name, True, f"{where} answered", time.monotonic() - started)
