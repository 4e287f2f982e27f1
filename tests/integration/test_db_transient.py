"""A brief database error does not fail a study: PostgreSQL kills the job worker's connection
mid-job (pg_terminate_backend), the node retries and the job ends `done`; killed while the
dispatcher records a delivery, the delivery is recorded sent (not left `sending` to be sent
again after its lease). Permanent errors are not retried."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError, OperationalError

from dicomnode.db import open_database
from dicomnode.db.models import AuditEvent, Delivery, DeliveryState
from dicomnode.db.transient import is_transient, retrying
from dicomnode.dispatch import outbox
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.jobs import ProcessingService, queue
from dicomnode.registry import load_registry
from dicomnode.routing import load_presets
from dicomnode.settings import Settings
from tests.support.databases import POSTGRES_ADMIN_URL, postgres_database
from tests.support.dicom_files import write_op
from tests.support.executor_fixtures import add_study, write_diamond, write_preset
from tests.support.peers import free_port
from tests.support.storescp import STORESCP_AET, StoreScp

pytestmark = pytest.mark.integration


@pytest.mark.postgres
def test_a_connection_killed_mid_job_is_retried_and_the_job_completes(tmp_path: Path) -> None:
    import psycopg

    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    write_preset(tmp_path / "presets", "screening", ["total"])
    with postgres_database() as url:
        settings = Settings.model_validate({
            "storage": {"path": storage}, "database": {"url": url, "retry_seconds": 0.1},
            "registry": {"path": tmp_path / "registry"},
            "presets": {"path": tmp_path / "presets"},
            "inference": {"workers": 0, "lease_seconds": 30},
        })
        database = open_database(url)
        admin = psycopg.connect(
            POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"),
            autocommit=True)
        try:
            registry = load_registry(settings.registry.path)
            presets = load_presets(settings.presets.path, registry=registry, destinations=set())
            service = ProcessingService(settings, database, registry, presets)
            add_study(database, storage, [200, 200])
            assert service.plan_pending()
            killed: list[int] = []

            def kill_this_backend(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
                # The worker loading the study's instances: PostgreSQL terminates the very
                # backend the statement is about to run on (and waits until it is gone).
                if not killed and "FROM instances JOIN studies" in statement:
                    pid = conn.connection.dbapi_connection.info.backend_pid
                    admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
                    killed.append(pid)

            event.listen(database.engine, "before_cursor_execute", kill_this_backend)
            try:
                job_id = service.run_once()
            finally:
                event.remove(database.engine, "before_cursor_execute", kill_this_backend)
            assert killed, "the kill never fired"
            assert job_id is not None
            detail = queue.job_detail(database, job_id)
            assert detail["state"] == "done", detail["outcome"]
            with database.transaction() as session:
                retried = session.scalars(select(AuditEvent.detail)
                                          .where(AuditEvent.kind == "database-retry")).all()
            assert len(retried) == 1 and f"job {job_id}" in (retried[0] or "")
        finally:
            admin.close()
            database.dispose()


@pytest.mark.postgres
def test_a_connection_killed_while_a_delivery_is_recorded_sent_is_retried(
    tmp_path: Path
) -> None:
    import psycopg

    pacs = StoreScp(tmp_path / "pacs", free_port()).start()
    storage = tmp_path / "storage"
    result = write_op(storage / "results" / "sr.dcm")
    admin = psycopg.connect(POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"),
                            autocommit=True)
    try:
        with postgres_database() as url:
            settings = Settings.model_validate({
                "storage": {"path": storage}, "database": {"url": url, "retry_seconds": 0.1},
                "destinations": {"pacs": {"ae_title": STORESCP_AET, "host": "127.0.0.1",
                                          "port": pacs.port}},
            })
            database = open_database(url)
            try:
                with database.transaction() as session:
                    outbox.enqueue(session, result, ["pacs"], known_destinations=["pacs"])
                killed: list[int] = []

                def kill_this_backend(conn: Any, _cursor: Any, statement: str,
                                      parameters: Any, *_: Any) -> None:
                    # The UPDATE that records the answered C-STORE: its connection dies.
                    if not killed and statement.startswith("UPDATE deliveries") \
                            and DeliveryState.SENT in str(parameters):
                        pid = conn.connection.dbapi_connection.info.backend_pid
                        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
                        killed.append(pid)

                event.listen(database.engine, "before_cursor_execute", kill_this_backend)
                try:
                    passed = Dispatcher(settings, database).run_once()
                finally:
                    event.remove(database.engine, "before_cursor_execute", kill_this_backend)
                assert killed, "the kill never fired"
                with database.transaction() as session:
                    state = session.scalars(select(Delivery.state)).one()
            finally:
                database.dispose()
    finally:
        admin.close()
        pacs.stop()
    assert passed.sent == 1 and state == DeliveryState.SENT
    assert list(pacs.receptions().values()) == [1]


def test_only_transient_errors_are_retried() -> None:
    locked = OperationalError("UPDATE x", {}, sqlite3.OperationalError("database is locked"))
    missing = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))
    duplicate = IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint"))
    assert is_transient(locked)
    assert not is_transient(missing) and not is_transient(duplicate)
    calls: list[int] = []
    delays: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise locked
        return "ok"

    assert retrying(flaky, what="t", attempts=5, first_delay=0.5, sleep=delays.append) == "ok"
    assert delays == [0.5, 1.0]

    def permanent() -> None:
        calls.append(1)
        raise missing

    calls.clear()
    with pytest.raises(OperationalError):
        retrying(permanent, what="t", attempts=5, first_delay=0.5, sleep=delays.append)
    assert len(calls) == 1

    def always_locked() -> None:
        calls.append(1)
        raise locked

    calls.clear()
    with pytest.raises(OperationalError):  # bounded
        retrying(always_locked, what="t", attempts=3, first_delay=0.1, sleep=lambda _: None)
    assert len(calls) == 4
