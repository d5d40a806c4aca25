"""`lora-studio admin`: users of the admin page (passwords stored as Argon2 hashes)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

admin_app = typer.Typer(no_args_is_help=True, help="Users of the admin page at /admin.")


@admin_app.command("create")
def create(
    username: Annotated[str, typer.Option("--username", help="login name")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="LORA_STUDIO_DATA_DIR", help="catalog and stored files"),
    ] = None,
):
    """Create an admin user; the password is prompted for twice (or read from stdin)."""
    from app.cli import _fail, _guard, _studio
    from db.session import unit_of_work
    from db.users import UserRepository

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

    @_guard
    def run():
        with unit_of_work(_studio(data_dir).sessions) as session:
            UserRepository(session).create(username, password)

    if not password:
        _fail("the password is empty")
    run()
    typer.echo(f"created admin user {username!r}; log in at /admin/login")
