"""Outbox rules without a network: backoff, idempotent enqueue, claims, lapsed claims, retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import DeliveryState
from dicomnode.dispatch import outbox
from dicomnode.dispatch.backoff import retry_delay
from dicomnode.errors import DeliveryNotFoundError, DispatchError
from dicomnode.results.seg import build_segmentation
from dicomnode.settings import DispatchSettings
from tests.unit.results.sources import masks_for, source_image

SETTINGS = DispatchSettings(first_delay_seconds=10, factor=3, max_delay_seconds=200,
                            max_attempts=3, batch_size=2, lease_seconds=60)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_backoff_grows_by_the_factor_and_is_capped() -> None:
    assert [retry_delay(SETTINGS, n).total_seconds() for n in (1, 2, 3, 4, 5)] == [
        10, 30, 90, 200, 200]


@pytest.fixture
def database(db_url: str) -> Database:
    return open_database(db_url)


def _file(tmp_path: Path) -> Path:
    source, vessels, disc = source_image("op", size=64, study_uid=generate_uid())
    path = tmp_path / f"{generate_uid()}.dcm"
    build_segmentation(source, masks_for(vessels, disc)).save_as(path)
    return path


def test_enqueue_is_idempotent_and_checks_destinations(database: Database,
                                                       tmp_path: Path) -> None:
    path = _file(tmp_path)
    with database.transaction() as session:
        outbox.enqueue(session, path, ["pacs", "archive"], now=T0)
    with database.transaction() as session:
        outbox.enqueue(session, path, ["pacs"], now=T0)
        with pytest.raises(DispatchError, match="unknown destination"):
            outbox.enqueue(session, path, ["nowhere"], known_destinations=["pacs"])
    rows = outbox.list_deliveries(database)
    assert sorted(r["destination"] for r in rows) == ["archive", "pacs"]
    with database.transaction() as session, pytest.raises(DispatchError, match="not a readable"):
        outbox.enqueue(session, tmp_path / "missing.dcm", ["pacs"])


def test_attempts_back_off_then_fail_and_retry_resets(database: Database,
                                                      tmp_path: Path) -> None:
    # The slow pace after the last fast attempt is off here (its own test is below): failed
    # then means failed until an operator retries.
    settings = SETTINGS.model_copy(update={"give_up_after_hours": 0})
    with database.transaction() as session:
        outbox.enqueue(session, _file(tmp_path), ["pacs"], now=T0)
    now = T0
    for attempt in (1, 2, 3):
        [claimed] = outbox.claim_due(database, settings, "me", now=now)
        assert claimed.attempts == attempt
        assert outbox.claim_due(database, settings, "other", now=now) == []  # held
        state = outbox.mark_attempt_failed(database, settings, claimed.id, "down", now=now)
        if attempt < 3:
            assert state == DeliveryState.PENDING
            delay = retry_delay(settings, attempt)
            assert outbox.claim_due(database, settings, "me", now=now + delay / 2) == []
            now = now + delay
        else:
            assert state == DeliveryState.FAILED
    assert outbox.claim_due(database, settings, "me", now=now + timedelta(days=1)) == []
    [row] = outbox.list_deliveries(database, state=DeliveryState.FAILED)
    assert outbox.retry(database, [row["id"]], now=now) == [row["id"]]
    [again] = outbox.claim_due(database, settings, "me", now=now)
    assert again.attempts == 1
    with pytest.raises(DispatchError, match="not failed"):
        outbox.retry(database, [row["id"]])
    with pytest.raises(DeliveryNotFoundError):
        outbox.retry(database, [9999])


def test_a_failed_delivery_is_still_tried_at_the_slow_pace_until_it_gives_up(
        database: Database, tmp_path: Path) -> None:
    with database.transaction() as session:
        outbox.enqueue(session, _file(tmp_path), ["pacs"], now=T0)
    now = T0
    for _ in range(SETTINGS.max_attempts):
        [claimed] = outbox.claim_due(database, SETTINGS, "me", now=now)
        state = outbox.mark_attempt_failed(database, SETTINGS, claimed.id, "down", now=now)
        now = now + timedelta(seconds=SETTINGS.max_delay_seconds)
    assert state == DeliveryState.FAILED
    failed_at = now - timedelta(seconds=SETTINGS.max_delay_seconds)
    slow = timedelta(seconds=SETTINGS.slow_retry_seconds)
    assert outbox.claim_due(database, SETTINGS, "me", now=failed_at + slow / 2) == []
    [again] = outbox.claim_due(database, SETTINGS, "me", now=failed_at + slow)
    assert again.attempts == SETTINGS.max_attempts + 1
    outbox.mark_attempt_failed(database, SETTINGS, again.id, "down", now=failed_at + slow)
    # Past dispatch.give_up_after_hours since it was queued: failed for good (operator retry).
    late = T0 + timedelta(hours=SETTINGS.give_up_after_hours, seconds=1)
    assert outbox.claim_due(database, SETTINGS, "me", now=late) == []


def test_a_claim_left_by_a_dead_node_lapses(database: Database, tmp_path: Path) -> None:
    with database.transaction() as session:
        outbox.enqueue(session, _file(tmp_path), ["pacs"], now=T0)
    [first] = outbox.claim_due(database, SETTINGS, "dead", now=T0)
    lease = timedelta(seconds=SETTINGS.lease_seconds)
    assert outbox.claim_due(database, SETTINGS, "alive", now=T0 + lease / 2) == []
    [second] = outbox.claim_due(database, SETTINGS, "alive", now=T0 + lease)
    assert (second.id, second.attempts) == (first.id, 2)


def test_batch_size_is_per_destination(database: Database, tmp_path: Path) -> None:
    with database.transaction() as session:
        for _ in range(3):
            outbox.enqueue(session, _file(tmp_path), ["pacs", "archive"], now=T0)
    claimed = outbox.claim_due(database, SETTINGS, "me", now=T0)
    assert sorted(c.destination for c in claimed) == ["archive"] * 2 + ["pacs"] * 2
