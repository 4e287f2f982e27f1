"""Result encoding per job: an administrator queues a failed encoding again.

The rules (what may be retried, the refusal's wording, the audit row) are bookkeeping's, the
same as `dicomnode results retry`; this only maps them to HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from dicomnode.errors import JobNotFoundError
from dicomnode.results import bookkeeping
from dicomnode.results.bookkeeping import RetryRefused
from dicomnode.web.deps import Admin, State

logger = logging.getLogger(__name__)

router = APIRouter(tags=["results"])


@router.post("/jobs/{job_id}/results/retry",
             summary="Encode a job's failed result set again (the node's next pass does it)")
def retry_results(job_id: int, state: State, who: Admin) -> dict[str, Any]:
    try:
        bookkeeping.retry(state.database, [job_id], actor=who.name)
    except JobNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except RetryRefused as exc:
        raise HTTPException(409, str(exc)) from exc
    return bookkeeping.result_set_of(state.database, job_id)
