"""Jobs: a completed, routed study's resolved graph, queued in the database and run by workers."""

from dicomnode.jobs.service import ProcessingService

__all__ = ["ProcessingService"]
