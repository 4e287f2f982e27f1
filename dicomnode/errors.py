"""The project's exceptions: one base, a few precise subclasses."""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base of every error dicomnode raises on purpose."""


class ConfigError(DicomNodeError):
    """The settings file is missing, unreadable or invalid (message names file and key)."""


class DatabaseError(DicomNodeError):
    """The database cannot be reached or its schema cannot be brought up to date."""


class StorageError(DicomNodeError):
    """A received file could not be stored durably."""


class StudyNotFoundError(DicomNodeError):
    """An operation named a study the database does not hold."""


class ManifestError(DicomNodeError):
    """A model manifest or its ONNX file is invalid (message names the model, file and reason)."""


class RegistryLookupError(DicomNodeError):
    """A lookup named a model id or version that the registry does not hold."""


class PresetError(DicomNodeError):
    """A preset file is invalid: the message names the file, the line where known, and the field.

    `problems` holds every problem found, so a validator can list them all at once.
    """

    def __init__(self, message: str, problems: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class ResolutionError(DicomNodeError):
    """A model selection cannot become a graph.

    `kind` is one of: unknown, version, left_out, modality, conflict, cycle, selection, input.
    `models` names the models involved; `short` is a phrase for a greyed-out choice in the console
    (e.g. "conflicts with vessel-seg").
    """

    def __init__(
        self, message: str, *, kind: str, models: tuple[str, ...] = (), short: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.models = models
        self.short = short if short is not None else message


class DecodeError(DicomNodeError):
    """Pixel data could not be decoded (message names the SOP Instance UID and transfer syntax)."""


class RoutingError(DicomNodeError):
    """A study's files could not be read for routing (message names the file)."""


class InferenceError(DicomNodeError):
    """A model could not be loaded or run (message names the model@version and the reason)."""


class InferenceUnavailableError(InferenceError):
    """A remote inference server is down, overloaded or too slow: transient, retry later.

    Never a model's failure: the job waits and is tried again.
    """


class JobNotFoundError(DicomNodeError):
    """An operation named a job the database does not hold."""


class DispatchError(DicomNodeError):
    """A result object cannot be queued or sent (message names the file or destination)."""


class DeliveryNotFoundError(DicomNodeError):
    """An operation named a delivery (outbox row) the database does not hold."""


class UserError(DicomNodeError):
    """A console/API user cannot be created or found (message names the user and the reason)."""
