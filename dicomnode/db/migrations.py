"""Schema migrations: numbered steps, applied in order at start, recorded in schema_version.

Each step defines the tables it creates with its own frozen Core definitions, so a step
never changes meaning when the ORM models move on. To change the schema: change
`models.py` and append a step here (tests/unit/test_migrations.py checks the two agree).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)

from dicomnode.db.engine import Database
from dicomnode.errors import DatabaseError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    upgrade: Callable[[Connection], None]


def _v1_studies_series_instances(conn: Connection) -> None:
    md = MetaData()
    Table(
        "studies", md,
        Column("id", Integer, primary_key=True),
        Column("study_uid", String(64), unique=True, index=True, nullable=False),
        Column("patient_id", String(64)),
        Column("calling_ae", String(16)),
        Column("called_ae", String(16)),
        Column("state", String(16), index=True, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("last_instance_at", DateTime(timezone=True), nullable=False),
        Column("quiet_until", DateTime(timezone=True), index=True),
        Column("completed_at", DateTime(timezone=True)),
        Column("completed_reason", String(32)),
        Column("needs_reprocess", Boolean, nullable=False),
    )
    Table(
        "series", md,
        Column("id", Integer, primary_key=True),
        Column("study_id", Integer, ForeignKey("studies.id"), index=True, nullable=False),
        Column("series_uid", String(64), unique=True, index=True, nullable=False),
        Column("modality", String(16)),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "instances", md,
        Column("id", Integer, primary_key=True),
        Column("study_id", Integer, ForeignKey("studies.id"), index=True, nullable=False),
        Column("series_id", Integer, ForeignKey("series.id"), index=True, nullable=False),
        Column("sop_instance_uid", String(64), unique=True, index=True, nullable=False),
        Column("sop_class_uid", String(64), nullable=False),
        Column("transfer_syntax_uid", String(64), nullable=False),
        Column("modality", String(16)),
        Column("laterality", String(2)),
        Column("path", Text, nullable=False),
        Column("size_bytes", BigInteger, nullable=False),
        Column("calling_ae", String(16)),
        Column("received_at", DateTime(timezone=True), nullable=False),
        Column("late", Boolean, nullable=False),
    )
    md.create_all(conn)


def _v2_audit_events(conn: Connection) -> None:
    md = MetaData()
    Table(
        "audit_events", md,
        Column("id", Integer, primary_key=True),
        Column("at", DateTime(timezone=True), index=True, nullable=False),
        Column("kind", String(32), index=True, nullable=False),
        Column("actor", String(64)),
        Column("calling_ae", String(16)),
        Column("peer", String(64)),
        Column("study_uid", String(64), index=True),
        Column("sop_instance_uid", String(64)),
        Column("status", Integer),
        Column("detail", Text),
    )
    md.create_all(conn)


def _v3_study_announced_at(conn: Connection) -> None:
    column_type = DateTime(timezone=True).compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE studies ADD COLUMN announced_at {column_type}"))


def _v4_jobs_model_runs(conn: Connection) -> None:
    md = MetaData()
    Table("studies", md, Column("id", Integer, primary_key=True))  # FK target only
    Table(
        "jobs", md,
        Column("id", Integer, primary_key=True),
        Column("study_id", Integer, ForeignKey("studies.id"), index=True, nullable=False),
        Column("study_uid", String(64), index=True, nullable=False),
        Column("preset", String(64)),
        Column("graph_json", Text, nullable=False),
        Column("state", String(16), index=True, nullable=False),
        Column("reason", String(32), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("claimed_by", String(128)),
        Column("lease_until", DateTime(timezone=True), index=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("outcome_json", Text),
        Column("output_path", Text),
    )
    Table(
        "model_runs", md,
        Column("id", Integer, primary_key=True),
        Column("job_id", Integer, ForeignKey("jobs.id"), index=True, nullable=False),
        Column("model_id", String(64), nullable=False),
        Column("version", String(32), nullable=False),
        Column("provider", String(64)),
        Column("images", Integer, nullable=False),
        Column("batch_size", Integer, nullable=False),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("duration_ms", Float),
        Column("status", String(16), nullable=False),
        Column("error", Text),
        Column("skipped_json", Text),
    )
    md.create_all(conn, tables=[md.tables["jobs"], md.tables["model_runs"]])


def _v5_deliveries(conn: Connection) -> None:
    md = MetaData()
    Table(
        "deliveries", md,
        Column("id", Integer, primary_key=True),
        Column("path", Text, nullable=False),
        Column("sop_instance_uid", String(64), index=True, nullable=False),
        Column("sop_class_uid", String(64), nullable=False),
        Column("study_uid", String(64), index=True),
        Column("destination", String(64), nullable=False),
        Column("state", String(16), index=True, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("next_attempt_at", DateTime(timezone=True), index=True, nullable=False),
        Column("last_error", Text),
        Column("claimed_by", String(128)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True)),
        UniqueConstraint("sop_instance_uid", "destination"),
    )
    md.create_all(conn)


def _v6_results(conn: Connection) -> None:
    md = MetaData()
    Table("jobs", md, Column("id", Integer, primary_key=True))  # FK target only
    Table(
        "result_sets", md,
        Column("id", Integer, primary_key=True),
        Column("job_id", Integer, ForeignKey("jobs.id"), unique=True, index=True,
               nullable=False),
        Column("study_uid", String(64), index=True, nullable=False),
        Column("state", String(16), index=True, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("error", Text),
        Column("folder", Text),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
    )
    Table(
        "results", md,
        Column("id", Integer, primary_key=True),
        Column("job_id", Integer, ForeignKey("jobs.id"), index=True, nullable=False),
        Column("study_uid", String(64), index=True, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("sop_instance_uid", String(64), unique=True, index=True, nullable=False),
        Column("sop_class_uid", String(64), nullable=False),
        Column("series_instance_uid", String(64), nullable=False),
        Column("source_uid", String(64)),
        Column("path", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    md.create_all(conn, tables=[md.tables["result_sets"], md.tables["results"]])


def _v7_users_sessions_preset_revisions(conn: Connection) -> None:
    md = MetaData()
    Table(
        "users", md,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), unique=True, index=True, nullable=False),
        Column("role", String(16), nullable=False),
        Column("password_hash", String(256), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("disabled", Boolean, nullable=False),
    )
    Table(
        "api_tokens", md,
        Column("id", Integer, primary_key=True),
        Column("user_id", Integer, ForeignKey("users.id"), index=True, nullable=False),
        Column("token_hash", String(64), unique=True, index=True, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("last_used_at", DateTime(timezone=True)),
    )
    Table(
        "web_sessions", md,
        Column("id", Integer, primary_key=True),
        Column("user_id", Integer, ForeignKey("users.id"), index=True, nullable=False),
        Column("token_hash", String(64), unique=True, index=True, nullable=False),
        Column("csrf_token", String(64), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("expires_at", DateTime(timezone=True), index=True, nullable=False),
    )
    Table(
        "preset_revisions", md,
        Column("id", Integer, primary_key=True),
        Column("preset_id", String(64), index=True, nullable=False),
        Column("action", String(16), nullable=False),
        Column("actor", String(64), nullable=False),
        Column("at", DateTime(timezone=True), index=True, nullable=False),
        Column("previous", Text),
        Column("content", Text),
    )
    md.create_all(conn)


def _v8_model_evaluations(conn: Connection) -> None:
    md = MetaData()
    Table(
        "model_evaluations", md,
        Column("id", Integer, primary_key=True),
        Column("model_id", String(64), index=True, nullable=False),
        Column("version", String(64), nullable=False),
        Column("dataset", String(256), nullable=False),
        Column("dataset_sha256", String(64), nullable=False),
        Column("task", String(16), nullable=False),
        Column("images", Integer, nullable=False),
        Column("figures", Text, nullable=False),
        Column("measured_at", DateTime(timezone=True), nullable=False),
    )
    md.create_all(conn)


def _v9_login_failures(conn: Connection) -> None:
    md = MetaData()
    Table(
        "login_failures", md,
        Column("id", Integer, primary_key=True),
        Column("at", DateTime(timezone=True), index=True, nullable=False),
        Column("user_name", String(64), index=True, nullable=False),
        Column("address", String(64), index=True),
    )
    md.create_all(conn)


def _v10_retention(conn: Connection) -> None:
    column_type = DateTime(timezone=True).compile(dialect=conn.dialect)
    for table, column in (("studies", "purged_at"), ("studies", "purge_finished_at"),
                          ("studies", "results_purged_at"),
                          ("studies", "results_purge_finished_at"),
                          ("instances", "purged_at"), ("results", "purged_at")):
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {column_type}"))
    conn.execute(text("CREATE INDEX ix_studies_purged_at ON studies (purged_at)"))


def _v11_study_date_station(conn: Connection) -> None:
    for name, column_type in (("study_date", String(8)), ("station_name", String(64))):
        compiled = column_type.compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE studies ADD COLUMN {name} {compiled}"))
    conn.execute(text("CREATE INDEX ix_studies_study_date ON studies (study_date)"))


def _v12_model_runs_not_analysed(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE model_runs ADD COLUMN not_analysed_json TEXT"))


def _v13_result_sets_objects(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE result_sets ADD COLUMN objects_json TEXT"))


MIGRATIONS: list[Migration] = [
    Migration(1, "studies, series, instances", _v1_studies_series_instances),
    Migration(2, "audit trail", _v2_audit_events),
    Migration(3, "studies.announced_at (completion hooks run)", _v3_study_announced_at),
    Migration(4, "jobs and model runs (graph execution)", _v4_jobs_model_runs),
    Migration(5, "deliveries (outbox of result objects)", _v5_deliveries),
    Migration(6, "result sets and results (encoded SR, SEG, overlay)", _v6_results),
    Migration(7, "users, API tokens, console sessions, preset revisions",
              _v7_users_sessions_preset_revisions),
    Migration(8, "model evaluations (dicomnode evaluate --record)", _v8_model_evaluations),
    Migration(9, "failed logins (login throttling)", _v9_login_failures),
    Migration(10, "retention: purged files marked on studies, instances, results",
              _v10_retention),
    Migration(11, "studies.study_date and station_name (the operator's study list)",
              _v11_study_date_station),
    Migration(12, "model_runs.not_analysed_json (coded reason per image not analysed)",
              _v12_model_runs_not_analysed),
    Migration(13, "result_sets.objects_json (every object of an encoded set, kept ones too)",
              _v13_result_sets_objects),
]

HEAD = MIGRATIONS[-1].version


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    value = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    return int(value or 0)


def upgrade(database: Database, target: int | None = None) -> int:
    """Bring the schema up to `target` (default: head). Returns the version reached.

    Runs in one transaction; on PostgreSQL an advisory lock keeps two nodes starting at
    once from migrating together (SQLite's BEGIN IMMEDIATE does the same there).
    """
    goal = HEAD if target is None else target
    try:
        with database.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(741852963)"))
            conn.execute(
                text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            )
            version = current_version(conn)
            if version > HEAD:
                raise DatabaseError(
                    f"database schema version {version} is newer than this dicomnode "
                    f"(knows up to {HEAD}); upgrade dicomnode"
                )
            for step in MIGRATIONS:
                if version < step.version <= goal:
                    logger.info("migrating database to version %d: %s", step.version,
                                step.description)
                    step.upgrade(conn)
                    conn.execute(
                        text("INSERT INTO schema_version (version) VALUES (:v)"),
                        {"v": step.version},
                    )
                    version = step.version
            return version
    except DatabaseError:
        raise
    except Exception as exc:  # any driver error: say which database, keep the cause
        raise DatabaseError(f"cannot prepare database {database.engine.url!r}: {exc}") from exc
