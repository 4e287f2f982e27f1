"""Database URLs for tests: a fresh SQLite file, or a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.peers import unavailable

# These machines (and CI) run PostgreSQL here with trust auth; override for elsewhere.
POSTGRES_ADMIN_URL = os.environ.get(
    "DICOMNODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create a uniquely named database, yield its URL, drop it afterwards."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the test extra installs it
        unavailable("psycopg not installed (pip install -e '.[test]')")
        raise
    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {admin}: {exc}")
        raise
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'dicomnode.db'}"
    elif kind == "postgres":
        with postgres_database() as url:
            yield url
    else:
        raise ValueError(kind)
