"""`dicomnode users add NAME --role admin|viewer|sender`, `dicomnode users token NAME`,
`dicomnode users list`: console and API accounts. There is no default account: the first admin
is made with `users add`."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from sqlalchemy import func, select

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.db.models import ApiToken, User, UserRole, as_utc
from dicomnode.errors import UserError
from dicomnode.web import auth


def register(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="console and API users")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument("--role", choices=UserRole.ALL, required=True)
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add_config_option(add)
    add.set_defaults(func=run_add)
    token = actions.add_parser("token", help="print a new API bearer token for a user")
    token.add_argument("name")
    add_config_option(token)
    token.set_defaults(func=run_token)
    listing = actions.add_parser("list", help="users, roles and how many API tokens each has")
    add_config_option(listing)
    add_json_option(listing)
    listing.set_defaults(func=run_list)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ")
    return first


def run_add(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    password = _password(args)
    with opened_database(settings.database.url) as database:
        auth.add_user(database, args.name, args.role, password)
    print(f"user {args.name} added with role {args.role}")
    return 0


def run_token(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        token = auth.issue_token(database, args.name)
    print(token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database, database.transaction() as session:
        tokens = dict(session.execute(
            select(ApiToken.user_id, func.count()).group_by(ApiToken.user_id)).all())
        rows = [
            {"name": u.name, "role": u.role, "disabled": u.disabled,
             "api_tokens": int(tokens.get(u.id, 0)),
             "created_at": as_utc(u.created_at).isoformat()}
            for u in session.scalars(select(User).order_by(User.name))
        ]
    if args.json:
        print_json(rows)
    else:
        print_table(["NAME", "ROLE", "TOKENS", "CREATED"],
                    [[r["name"], f"{r['role']}{' (disabled)' if r['disabled'] else ''}",
                      r["api_tokens"], r["created_at"]] for r in rows])
    return 0
