"""Worker names that say where a worker ran: `host:boot:pid:token[:n]`, with the machine's boot id, so that a
restarted server can tell at once that a job's worker died with an earlier process on this machine (same host,
and another boot or a pid no longer running) and put the job back without waiting out the stale timeout.
Workers of other machines, and of processes still alive here, are left to their heartbeats."""

from __future__ import annotations

import functools
import os
import secrets
import socket
from pathlib import Path

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_id() -> str:
    """Eight hex digits that change when the machine reboots ("noboot" where the OS does not say)."""
    try:
        return BOOT_ID_FILE.read_text().strip().replace("-", "")[:8] or "noboot"
    except OSError:
        return "noboot"


def process_name() -> str:
    """This process's worker-name prefix; a fresh random token each call (two executors never share one)."""
    return f"{socket.gethostname()}:{boot_id()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def died_here(worker: str) -> bool:
    """True when `worker` (a `process_name()`, maybe with `:n`) ran on this machine in a process that is gone:
    an earlier boot, or a pid that no longer runs. False for other machines and for names not of this form."""
    parts = worker.split(":")
    if len(parts) < 4 or not parts[2].isdigit():
        return False
    host, boot, pid = parts[0], parts[1], int(parts[2])
    if host != socket.gethostname():
        return False
    return boot != boot_id() or not pid_alive(pid)


__all__ = ["boot_id", "died_here", "pid_alive", "process_name"]
