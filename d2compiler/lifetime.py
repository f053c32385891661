"""A launched process's lifetime is bound to its launcher's. Stdlib only: `python -m d2compiler`
calls `die_with_launcher()` before it imports torch, so a process killed while it is still starting
leaves nothing behind."""

from __future__ import annotations

import os

PR_SET_PDEATHSIG = 1
LAUNCHER_PID = "D2C_LAUNCHER_PID"  # set by `d2c run --nproc N` for every process it starts


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (torchrun starts each process in a
    session of its own, so a killed launcher would otherwise leave them running); exit at once when
    the parent is already gone. No-op where there is no prctl."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def alive(pid: int) -> bool:
    """Whether process `pid` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def die_with_launcher() -> None:
    """In a process started by `d2c run --nproc`: die with the parent (torchrun, which dies with the
    launcher), and exit at once if the launcher is already gone (killed between the fork and now)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return
    die_with_parent()
    if launcher.isdigit() and not alive(int(launcher)):
        os._exit(1)
