"""Worker names carry host, boot id and pid, so that a restarted server knows which dead workers were its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from app.jobs.identity import boot_id, died_here, process_name


def test_worker_names_say_whether_their_process_on_this_machine_is_gone():
    host, boot = socket.gethostname(), boot_id()
    mine = process_name()
    assert mine.startswith(f"{host}:{boot}:{os.getpid()}:") and mine != process_name()
    assert not died_here(mine) and not died_here(f"{mine}:0")  # this process is alive
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    assert died_here(f"{host}:{boot}:{dead_pid}:abc123:0")  # a finished process on this machine
    assert died_here(
        f"{host}:{'0' * 8 if boot != '0' * 8 else '1' * 8}:{os.getpid()}:abc123:0"
    )  # another boot
    assert not died_here(f"other-{host}:{boot}:{dead_pid}:abc123:0")  # another machine: its heartbeat decides
    assert not died_here("ray:abc123:render-1") and not died_here("worker-1") and not died_here("")
