"""dicomnode.retention: purge received files and results once delivered (rows are kept)."""

from dicomnode.retention.purge import Purger, Report

__all__ = ["Purger", "Report"]
