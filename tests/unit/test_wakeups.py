"""Wake-ups on commit (dicomnode.db.wakeups): a subscribed Event is set once the marking
transaction commits, never on rollback; on PostgreSQL another process's commit (here another
Database, i.e. another connection pool) reaches a listening one through NOTIFY."""

from __future__ import annotations

import threading

import pytest

from dicomnode.db import open_database, wakeups
from dicomnode.db.engine import Database
from tests.support.databases import postgres_database


def test_a_commit_wakes_the_subscribers_of_its_topic_only_after_committing(
    db_url: str,
) -> None:
    database = open_database(db_url)
    jobs, outbox = threading.Event(), threading.Event()
    database.wakeups.subscribe(wakeups.JOBS, jobs)
    database.wakeups.subscribe(wakeups.OUTBOX, outbox)
    try:
        with database.transaction() as session:
            wakeups.mark(session, wakeups.JOBS)
            wakeups.mark(session, wakeups.JOBS)  # once is enough
            assert not jobs.is_set()  # not committed yet: nothing to find
        assert jobs.is_set() and not outbox.is_set()

        jobs.clear()
        with pytest.raises(RuntimeError), database.transaction() as session:
            wakeups.mark(session, wakeups.OUTBOX)
            raise RuntimeError("rolled back")
        with database.transaction():
            pass  # a later commit in a fresh session must not carry the rolled-back mark
        assert not outbox.is_set() and not jobs.is_set()

        database.wakeups.unsubscribe(wakeups.JOBS, jobs)
        with database.transaction() as session:
            wakeups.mark(session, wakeups.JOBS)
        assert not jobs.is_set()
        with pytest.raises(ValueError, match="unknown wake-up topic"), \
                database.transaction() as session:
            wakeups.mark(session, "nonsense")
    finally:
        database.dispose()


@pytest.mark.postgres
def test_another_processs_commit_wakes_a_listener_on_postgresql() -> None:
    with postgres_database() as db_url:
        _listener_is_woken(db_url)


def _listener_is_woken(db_url: str) -> None:
    producer, consumer = open_database(db_url), Database(db_url)
    results = threading.Event()
    consumer.wakeups.subscribe(wakeups.RESULTS, results)
    try:
        consumer.wakeups.listen()
        # The listener's first pass after LISTEN wakes everyone once: wait it out.
        assert results.wait(10)
        results.clear()
        with producer.transaction() as session:
            wakeups.mark(session, wakeups.RESULTS)
            session.flush()
            assert not results.wait(0.5)  # NOTIFY is delivered at commit, not before
        # Woken by the NOTIFY itself, well before a failed listener's reconnect pass (which
        # wakes every topic too, and once hid a listener that never listened).
        assert results.wait(wakeups._RECONNECT_SECONDS / 2)
    finally:
        producer.dispose()
        consumer.dispose()
