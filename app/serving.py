"""What `lora-studio serve` decides before it listens: whether the studio at / needs a login (always beyond
loopback, and locally on request), whether it may start at all (not open to a network by accident), the studio's
login check (the catalog's users, throttled per username), and the start-up summary it prints."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.admin.throttle import LoginThrottle
from app.facade import StudioFacade

if TYPE_CHECKING:  # the type only: the front ends never import the catalog's sessions
    from app.accounts import UserInfo

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, :: and every other interface or name."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ServeRefused(Exception):
    """`serve` will not start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Access:
    """Who may use the studio at /: `login` says whether it asks for a username and password."""

    login: bool
    open_to_network: bool  # listening beyond loopback with no login: warned about at start


def decide_access(host: str, setting: str, users: int) -> Access:
    """The studio's access for `serve --host HOST` with the studio_login setting ("auto", "always", "never")
    and the number of users in the catalog.

    Raises:
        ServeRefused: a login is needed (beyond loopback, or "always") and no user exists; or the setting is
            unknown.
    """
    if setting not in ("auto", "always", "never"):
        raise ServeRefused(f"studio_login {setting!r}: choose auto, always or never")
    local = is_loopback(host)
    login = setting == "always" or (setting == "auto" and not local)
    if login and users == 0:
        where = "it listens beyond this machine" if not local else "studio_login is 'always'"
        raise ServeRefused(
            f"--host {host}: the studio needs a login because {where}, and the catalog has no user yet. "
            "Create one with `lora-studio admin create --username NAME`, or pass --no-login to serve it to anyone who can "
            "reach it (not recommended)"
        )
    return Access(login=login, open_to_network=not login and not local)


def studio_login(studio: StudioFacade) -> Callable[[str, str], bool]:
    """The studio's password check: any user of the catalog (not only admins), with the admin page's throttle
    (counted per username: Gradio does not hand the client's address to this check)."""
    settings = studio.settings
    throttle = LoginThrottle(per_user=settings.admin_login_attempts, window_s=settings.admin_login_window_s)

    def check(username: str, password: str) -> bool:
        if throttle.retry_after("studio", username):
            log.warning("studio login for %r refused: too many failures", username)
            return False
        user = studio.accounts.verify_login(username, password, admin_only=False)
        if user is None:
            throttle.failed("studio", username)
            return False
        throttle.succeeded("studio", username)
        return True

    return check


def summary(
    studio: StudioFacade, host: str, port: int, access: Access, imported: list[str], users: list[UserInfo]
) -> list[str]:
    """The lines `serve` prints before it listens: where, what data, what was imported, who can get in
    (`users`: the catalog's, as `Accounts.list_users` gives them)."""
    settings = studio.settings
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}"
    lines = [
        f"LoRA Studio on {base}/  (admin {base}/admin/, REST API docs {base}/api/v1/docs)",
        f"data dir: {settings.root}  ({studio.library.count()} LoRAs in the catalog)",
        f"model: {settings.backbone} {settings.model or '(its default)'}; executor: {settings.executor} x "
        f"{settings.workers}",
    ]
    if imported:
        lines.append(f"imported on this start: {', '.join(imported)}")
    if not any(u.is_admin for u in users):
        lines.append(
            "admin page: no admin user yet; create one with `lora-studio admin create --username NAME`"
        )
    lines.append("REST API: needs a key (`lora-studio apikey create NAME`)")
    if access.login:
        lines.append("studio: login required (the catalog's users)")
    elif access.open_to_network:
        lines.append(
            f"WARNING: the studio listens on {host} with no login: anyone who can reach port {port} can "
            "render, train and change the catalog (--no-login)"
        )
    else:
        lines.append("studio: no login (this machine only); LORA_STUDIO_STUDIO_LOGIN=always asks for one")
    return lines


__all__ = ["Access", "ServeRefused", "decide_access", "is_loopback", "studio_login", "summary"]
