"""Database: SQLAlchemy models, engine/session factory, migrations."""

from dicomnode.db.engine import Database
from dicomnode.db.migrations import upgrade

__all__ = ["Database", "open_database", "upgrade"]


def open_database(url: str) -> Database:
    """Open the database and bring its schema up to date."""
    database = Database(url)
    upgrade(database)
    return database
