"""inference.backend / backends / remote: typed, checked, and a per-model override."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicomnode.settings import InferenceSettings


def test_remote_backend_needs_a_server() -> None:
    with pytest.raises(ValidationError, match=r"needs inference\.remote\.url"):
        InferenceSettings.model_validate({"backend": "remote"})
    with pytest.raises(ValidationError, match=r"needs inference\.remote\.url"):
        InferenceSettings.model_validate({"backends": {"vessel-seg": "remote"}})
    with pytest.raises(ValidationError, match="http"):
        InferenceSettings.model_validate({"backend": "remote", "remote": {"url": "triton:8000"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        InferenceSettings.model_validate({"remote": {"url": "http://t:8000", "grpc": True}})
    with pytest.raises(ValidationError):
        InferenceSettings.model_validate({"backend": "triton"})


def test_per_model_backend_overrides_the_default() -> None:
    config = InferenceSettings.model_validate({
        "backends": {"vessel-seg": "remote"},
        "remote": {"url": "http://triton:8000/", "timeout_seconds": 5},
    })
    assert config.remote is not None and config.remote.url == "http://triton:8000"
    assert config.backend_for("vessel-seg") == "remote"
    assert config.backend_for("optic-disc") == "onnxruntime"
    everywhere = InferenceSettings.model_validate({
        "backend": "remote", "backends": {"laterality": "onnxruntime"},
        "remote": {"url": "http://triton:8000"},
    })
    assert everywhere.backend_for("optic-disc") == "remote"
    assert everywhere.backend_for("laterality") == "onnxruntime"
