"""ORM models: the durable state of the node. One row per thing that happened."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class StudyState:
    """Study lifecycle states (strings in the database, so later states need no migration)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NOT_ROUTED = "not-routed"
    # Some models of the graph failed; the outputs of the others were kept.
    PARTIAL = "partial"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True, default=StudyState.RECEIVING)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When the quiet period ends; rebuilt into the scheduler at start.
    quiet_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_reason: Mapped[str | None] = mapped_column(String(32))
    # Instances arrived after completion: a later stage re-processes the study.
    needs_reprocess: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the on-complete hooks were run for this completion (migration 3). A study completed
    # elsewhere (another node, or `dicomnode study complete` with no node running) has it
    # NULL until a running node's sweep claims and announces it.
    announced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Retention (migration 10): when the received files were purged (rows kept; the instance
    # rows are marked first, then the files deleted, then `purge_finished_at` set), and the
    # same for the study's result objects.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    purge_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    results_purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    results_purge_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # From the first instance's header (migration 11), for the operator's study list:
    # Study Date as DICOM DA (YYYYMMDD), Station Name.
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    station_name: Mapped[str | None] = mapped_column(String(64))

    series: Mapped[list[Series]] = relationship(back_populates="study")
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    laterality: Mapped[str | None] = mapped_column(String(2))
    # Path relative to the storage root, so the store can be moved or shared between nodes.
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when retention purged the file (migration 10): `path` then names what it was.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class AuditEvent(Base):
    """What arrived, what was refused and why, what an operator did."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


def as_utc(value: datetime) -> datetime:
    """A timestamp read back from the database, made timezone-aware (UTC).

    SQLite keeps no zone, so values come back naive; every value the node writes is UTC.
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobState:
    """Job lifecycle: queued -> running (claimed, leased) -> done | partial | failed."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    PARTIAL = "partial"
    FAILED = "failed"
    FINISHED = (DONE, PARTIAL, FAILED)


class Job(Base):
    """One run of a resolved graph over a study's instances (migration 4)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    preset: Mapped[str | None] = mapped_column(String(64))
    # ResolvedGraph.to_dict() as JSON: exactly which models and versions made the results.
    graph_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED)
    # Why the job exists: "complete", "late-instances" or "rerun" (an operator's).
    reason: Mapped[str] = mapped_column(String(32), default="complete")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # JSON: what failed and why, what was skipped, the output folder.
    outcome_json: Mapped[str | None] = mapped_column(Text)
    output_path: Mapped[str | None] = mapped_column(Text)  # relative to the storage root

    runs: Mapped[list[ModelRun]] = relationship(back_populates="job")


class ModelRun(Base):
    """One model of a finished job: which version, where it ran, how long, what happened."""

    __tablename__ = "model_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str | None] = mapped_column(String(64))
    images: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # ok | skipped | failed
    error: Mapped[str | None] = mapped_column(Text)
    # JSON: SOP Instance UID -> why that image was skipped (gates).
    skipped_json: Mapped[str | None] = mapped_column(Text)
    # JSON (migration 12): SOP Instance UID -> {scheme, value, meaning, detail}, the coded
    # reason for every image the model did not analyse (skipped or lost to a failure).
    not_analysed_json: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="runs")


class DeliveryState:
    """Outbox row lifecycle: pending -> sending -> sent, or back to pending to retry; failed
    after the last attempt (an operator's `deliveries retry` makes it pending again)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    ALL = (PENDING, SENDING, SENT, FAILED)


class Delivery(Base):
    """One result object file to one destination (migration 5): the outbox."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # absolute, or relative to the storage root
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When a pending row is due; for a sending row, when its claim lapses (the node died).
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), index=True, default=utcnow
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ResultSetState:
    """Encoding of one finished job's outputs: encoded (objects written and queued), or
    failed (the reason in `error`; tried again up to the pipeline's attempt limit), or
    pending (an operator's `results retry` queued a failed one again; no row at all also
    means pending)."""

    PENDING = "pending"
    ENCODED = "encoded"
    FAILED = "failed"
    ALL = (PENDING, ENCODED, FAILED)


class ResultSet(Base):
    """Whether a finished job's results were encoded (migration 6): one row per job."""

    __tablename__ = "result_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True, index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    folder: Mapped[str | None] = mapped_column(Text)  # relative to the storage root
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Once encoded (migration 13): SOP Instance UIDs of every object of the set, those made
    # and those an earlier job's kept (reused objects get no Result row of this job).
    objects_json: Mapped[str | None] = mapped_column(Text)


class Result(Base):
    """One result object (SR, SEG or overlay) of a job (migration 6)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | seg | overlay
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    # The source image a SEG or overlay is made from; NULL for the study's SR.
    source_uid: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the storage root
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set when retention purged the file (migration 10); the row shows what was sent.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UserRole:
    """Console and API roles: admin may change presets and retry deliveries; viewer may look;
    sender may only send studies (DICOMweb STOW-RS, with an API token), nothing else."""

    ADMIN = "admin"
    VIEWER = "viewer"
    SENDER = "sender"
    ALL = (ADMIN, VIEWER, SENDER)


class User(Base):
    """A console/API user (migration 7). The password is stored as an scrypt hash with salt."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    """A bearer token for the REST API (migration 7); only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A console login (migration 7): the cookie holds the secret, the row its SHA-256."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PresetRevision(Base):
    """The content a preset file had before a console/API change (migration 7).

    `content` is NULL when the change created the file (there was nothing before).
    """

    __tablename__ = "preset_revisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    preset_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(16))  # create | update | delete
    actor: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    previous: Mapped[str | None] = mapped_column(Text)
    content: Mapped[str | None] = mapped_column(Text)  # NULL after a delete


class ModelEvaluation(Base):
    """A measured efficacy of a model version on a dataset (`dicomnode evaluate --record`,
    migration 8); the same record is written into the model's manifest `metrics`."""

    __tablename__ = "model_evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(256))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(16))
    images: Mapped[int] = mapped_column(Integer)
    figures: Mapped[str] = mapped_column(Text)  # JSON {name: number}
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginFailure(Base):
    """A failed console login (migration 9), counted per user name and per client address.

    In the database rather than in memory so that nodes sharing one PostgreSQL see the same
    counts and a restart does not reset them. Rows older than the window are deleted.
    """

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str | None] = mapped_column(String(64), index=True)
