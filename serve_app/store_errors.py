"""What "the store did not answer" looks like, for every store the router writes through:
quotas (`limits`' storage, Redis) and usage (Redis, or SQLite through SQLAlchemy). One tuple for
both, since either may be on Redis or on a database.
"""

from __future__ import annotations

import sqlite3

import redis
from limits.errors import StorageError
from sqlalchemy.exc import SQLAlchemyError

# sqlite3.Error: SQLAlchemy wraps the driver's errors, and this catches any it lets through.
STORE_ERRORS = (StorageError, redis.RedisError, SQLAlchemyError, sqlite3.Error, OSError)
