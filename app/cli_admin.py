"""`lora-studio apikey` (keys for the REST API, stored hashed) and `lora-studio admin` (users of the admin page,
passwords stored as Argon2 hashes), both through `Studio.accounts`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.cli_common import DataDir, _fail, _guard, _studio

admin_app = typer.Typer(no_args_is_help=True, help="Users of the admin page at /admin.")
apikey_app = typer.Typer(no_args_is_help=True, help="API keys for the REST API (stored hashed).")


@admin_app.command("create")
def create(
    username: Annotated[str, typer.Option("--username", help="login name")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")
    ] = False,
    data_dir: DataDir = None,
):
    """Create an admin user; the password is prompted for twice (or read from stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

    @_guard
    def run():
        _studio(data_dir).accounts.create_user(username, password)

    if not password:
        _fail("the password is empty")
    run()
    typer.echo(f"created admin user {username!r}; log in at /admin/login")


@apikey_app.command("create")
@_guard
def apikey_create(
    name: Annotated[str, typer.Argument(help="a name to tell the key by, e.g. the client's")],
    rate_limit: Annotated[int, typer.Option("--rate-limit", help="requests per minute")] = 60,
    data_dir: DataDir = None,
):
    """Create a key and print its secret once (only its hash is kept)."""
    key, secret = _studio(data_dir).accounts.create_api_key(name, rate_limit_per_minute=rate_limit)
    typer.echo(secret)
    typer.secho(
        f"API key {key.name!r} ({rate_limit}/min): the secret above is shown only now; keep it safe",
        err=True,
        fg=typer.colors.YELLOW,
    )


@apikey_app.command("list")
@_guard
def apikey_list(data_dir: DataDir = None):
    """List keys: name, prefix, rate limit, created, last used, revoked."""
    keys = _studio(data_dir).accounts.list_api_keys()
    if not keys:
        typer.echo("no API keys")
        return
    width = max(len(k.name) for k in keys)

    def day(t):
        return f"{t:%Y-%m-%d %H:%M}" if t else "-"

    for k in keys:
        state = f"revoked {day(k.revoked_at)}" if k.revoked_at else "active"
        typer.echo(
            f"{k.name:{width}}  {k.prefix}...  {k.rate_limit_per_minute:>5}/min  created {day(k.created_at)}  "
            f"used {day(k.last_used_at)}  {state}"
        )


@apikey_app.command("revoke")
@_guard
def apikey_revoke(name: Annotated[str, typer.Argument(help="the key's name")], data_dir: DataDir = None):
    """Revoke a key: requests with it are refused from now on."""
    key = _studio(data_dir).accounts.revoke_api_key(name)
    typer.echo(f"revoked {key.name!r} ({key.prefix}...)")
