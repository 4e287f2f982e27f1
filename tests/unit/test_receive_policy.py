"""Who may associate: called AE title and the caller allow-list."""

from __future__ import annotations

from dicomnode.receive.policy import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    CallerPolicy,
)
from dicomnode.settings import CallerSettings


def test_empty_list_admits_anyone_but_called_ae_is_checked() -> None:
    policy = CallerPolicy("DICOMNODE", [])
    assert policy.admits_anyone
    assert policy.check("DICOMNODE", "ANY", "10.0.0.1") is None
    rejection = policy.check("OTHER", "ANY", "10.0.0.1")
    assert rejection is not None and rejection.diagnostic == CALLED_AE_NOT_RECOGNISED


def test_allow_list_with_and_without_host() -> None:
    policy = CallerPolicy("DICOMNODE", [
        CallerSettings(ae_title="CAM1"),
        CallerSettings(ae_title="CAM2", host="127.0.0.1"),
    ])
    assert policy.check("DICOMNODE", "CAM1", "10.9.9.9") is None
    assert policy.check("DICOMNODE", "CAM2", "127.0.0.1") is None
    assert policy.check("DICOMNODE", "CAM2", "::ffff:127.0.0.1") is None
    for calling, host in (("CAM2", "10.0.0.2"), ("CAM3", "127.0.0.1")):
        rejection = policy.check("DICOMNODE", calling, host)
        assert rejection is not None and rejection.diagnostic == CALLING_AE_NOT_RECOGNISED


def test_unresolvable_host_admits_no_one() -> None:
    entry = CallerSettings(ae_title="CAM1", host="no-such-host.invalid")
    policy = CallerPolicy("DICOMNODE", [entry])
    assert policy.check("DICOMNODE", "CAM1", "127.0.0.1") is not None
