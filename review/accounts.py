"""Workbench accounts: argon2id password hashes, roles, and disabling (accounts are never deleted: reviews
and the audit log name them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Engine

from db.engine import writer
from db.models import User, as_utc
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.status import Role

users = User.__table__
_HASHER = PasswordHasher()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
# Verified when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


@dataclass(frozen=True)
class Account:
    """A workbench user as the app sees it: never the password hash."""

    id: int
    name: str
    role: Role
    disabled: bool
    created_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


def _account(row: sa.Row) -> Account:
    return Account(row.id, row.name, Role(row.role), bool(row.disabled), as_utc(row.created_at))


def add_user(engine: Engine, name: str, password: str, role: Role) -> Account:
    """Create an account; a bad or taken name, or a short password, is a UserError."""
    if not _NAME.match(name):
        raise UserError(
            ExitCode.USAGE, f"user name {name!r} is not allowed: letters, digits and . _ @ - (at most 64)"
        )
    if len(password) < MIN_PASSWORD:
        raise UserError(ExitCode.USAGE, f"the password must have at least {MIN_PASSWORD} characters")
    with writer(engine).begin() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
            raise UserError(ExitCode.USAGE, f"user {name} exists already")
        conn.execute(users.insert().values(name=name, password_hash=_HASHER.hash(password), role=role))
        row = conn.execute(sa.select(users).where(users.c.name == name)).one()
    return _account(row)


def list_users(engine: Engine) -> list[Account]:
    with engine.connect() as conn:
        return [_account(row) for row in conn.execute(sa.select(users).order_by(users.c.name))]


def disable_user(engine: Engine, name: str) -> Account:
    """Disable an account: it can no longer sign in, and its open sessions stop working at once."""
    with writer(engine).begin() as conn:
        done = conn.execute(users.update().where(users.c.name == name).values(disabled=True))
        if not done.rowcount:
            raise UserError(ExitCode.USAGE, f"no user named {name}")
        return _account(conn.execute(sa.select(users).where(users.c.name == name)).one())


def get_account(engine: Engine, user_id: int) -> Account | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
    return _account(row) if row else None


def authenticate(engine: Engine, name: str, password: str) -> Account | None:
    """The enabled account with this name and password, else None (same work either way)."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.name == name)).first()
    try:
        _HASHER.verify(row.password_hash if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or row.disabled:
        return None
    return _account(row)
