"""`dicomnode users add NAME --role admin|viewer|sender`, `users token NAME`, `users list`,
`users passwd|role|remove|disable|enable|unlock|revoke-tokens NAME`: console and API accounts.
There is no default account: the first admin is made with `users add`. Changes are audited as
`cli:<login name>` (web.accounts does the work, shared with the console's users page)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    cli_actor,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.db.models import UserRole
from dicomnode.errors import UserError
from dicomnode.web import accounts, auth
from dicomnode.web.login_throttle import LoginLimits


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

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument("name")
        add_config_option(parser)
        return parser

    passwd = action("passwd", "set a user's password (their console sessions end)")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.set_defaults(func=run_passwd)
    role = action("role", "change a user's role")
    role.add_argument("role", choices=UserRole.ALL)
    role.set_defaults(func=run_role)
    action("remove", "delete a user, their API tokens and sessions").set_defaults(func=run_remove)
    action("disable", "refuse a user's logins and API tokens (until enable)").set_defaults(
        func=lambda a: run_disabled(a, True))
    action("enable", "let a disabled user in again").set_defaults(
        func=lambda a: run_disabled(a, False))
    action("unlock", "clear the login throttle's failed sign-ins for a user name"
           ).set_defaults(func=run_unlock)
    revoke = action("revoke-tokens", "revoke a user's API tokens (all, or --token ID)")
    revoke.add_argument("--token", type=int, metavar="ID",
                        help="only this token (ids: users list --json)")
    revoke.set_defaults(func=run_revoke)


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
    with opened_database(settings.database.url) as database:
        rows = [a.as_json() for a in accounts.list_accounts(
            database, LoginLimits.from_settings(settings.web))]
    if args.json:
        print_json(rows)
    else:
        print_table(["NAME", "ROLE", "TOKENS", "FAILED LOGINS", "CREATED"],
                    [[r["name"], f"{r['role']}{' (disabled)' if r['disabled'] else ''}",
                      r["api_tokens"],
                      f"{r['failed_logins']}{' (locked)' if r['locked_for'] else ''}",
                      r["created_at"]] for r in rows])
    return 0


def run_passwd(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    password = _password(args)
    with opened_database(settings.database.url) as database:
        accounts.set_password(database, args.name, password, actor=cli_actor())
    print(f"password of {args.name} changed")
    return 0


def run_role(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        changed = accounts.set_role(database, args.name, args.role, actor=cli_actor())
    print(f"{args.name} is {'now' if changed else 'already'} {args.role}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        accounts.remove(database, args.name, actor=cli_actor())
    print(f"user {args.name} removed")
    return 0


def run_disabled(args: argparse.Namespace, disabled: bool) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        changed = accounts.set_disabled(database, args.name, disabled, actor=cli_actor())
    word = "disabled" if disabled else "enabled"
    print(f"user {args.name} {word}" if changed else f"user {args.name} was already {word}")
    return 0


def run_unlock(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        cleared = accounts.unlock(database, args.name, actor=cli_actor())
    print(f"{cleared} failed sign-in(s) of {args.name} cleared; {args.name} may log in")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with opened_database(settings.database.url) as database:
        revoked = accounts.revoke_tokens(database, args.name, actor=cli_actor(),
                                         token_id=args.token)
    print(f"{revoked} API token(s) of {args.name} revoked")
    return 0
