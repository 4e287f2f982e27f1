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
