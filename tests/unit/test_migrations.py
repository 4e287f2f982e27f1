"""Schema migrations: an older database upgrades in place; head matches the ORM models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, select, text

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.migrations import HEAD, current_version, upgrade
from dicomnode.db.models import Base, Study
from dicomnode.errors import DatabaseError


def test_version_1_database_with_a_row_upgrades_to_head(db_url: str) -> None:
    database = Database(db_url)
    try:
        assert upgrade(database, target=1) == 1
        now = datetime.now(UTC)
        with database.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (study_uid, patient_id, state, created_at, updated_at,"
                    " last_instance_at, needs_reprocess) VALUES ('1.2.3', 'P1', 'receiving',"
                    " :now, :now, :now, :false)"
                ),
                {"now": now, "false": False},
            )
        assert upgrade(database) == HEAD
        with database.transaction() as session:
            study = session.execute(select(Study)).scalar_one()
        assert (study.study_uid, study.patient_id, study.state) == ("1.2.3", "P1", "receiving")
        assert study.announced_at is None
        with database.engine.connect() as conn:
            assert current_version(conn) == HEAD
        assert upgrade(database) == HEAD  # idempotent
    finally:
        database.dispose()


def test_schema_at_head_matches_the_models(db_url: str) -> None:
    database = open_database(db_url)
    try:
        inspector = inspect(database.engine)
        for table in Base.metadata.sorted_tables:
            reflected = {column["name"] for column in inspector.get_columns(table.name)}
            assert reflected == {column.name for column in table.columns}, table.name
            nullable = {c["name"]: c["nullable"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if not column.primary_key:
                    assert nullable[column.name] == column.nullable, (table.name, column.name)
    finally:
        database.dispose()


def test_newer_database_is_refused(db_url: str) -> None:
    database = open_database(db_url)
    try:
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": HEAD + 1})
        with pytest.raises(DatabaseError, match="newer"):
            upgrade(database)
    finally:
        database.dispose()
