"""Database: SQLAlchemy models, engine/session factory, migrations."""

from collections.abc import Iterator
from contextlib import contextmanager

from dicomnode.db.engine import Database
from dicomnode.db.migrations import upgrade

__all__ = ["Database", "open_database", "opened_database", "upgrade"]


def open_database(url: str) -> Database:
    """Open the database and bring its schema up to date."""
    database = Database(url)
    upgrade(database)
    return database


@contextmanager
def opened_database(url: str) -> Iterator[Database]:
    """`open_database` for one short piece of work (a CLI command): disposed on leaving."""
    database = open_database(url)
    try:
        yield database
    finally:
        database.dispose()

