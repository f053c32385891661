"""`d2c run RECIPE --nproc N`: the same run in N processes on this machine, started by torch's own
launcher (`python -m torch.distributed.run --standalone`, i.e. torchrun), each process running
`python -m d2compiler run RECIPE ...`.

torchrun dies with this launcher and each process with torchrun (`lifetime.die_with_launcher`, called
before the process imports torch), so killing the launcher kills the run, even while its processes
are still starting. When a process fails, torchrun stops the others (they are waiting in a collective) and exits
non-zero. Each process also writes its one-line error to a file in a folder this launcher names
(`D2C_ERROR_DIR`), so that the launcher can end with the message of the process that failed first,
and with its exit status (2 for bad input, 1 for a bug)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from d2compiler.errors import D2Error
from d2compiler.lifetime import LAUNCHER_PID, die_with_parent

ERROR_DIR = "D2C_ERROR_DIR"


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` with `--nproc N` / `--nproc=N` removed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `d2c` with `argv` (without --nproc) in `nproc` processes under torchrun; returns the exit
    status the user should see."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared
    with tempfile.TemporaryDirectory(prefix="d2c-errors-") as errors:
        env[ERROR_DIR] = errors
        env[LAUNCHER_PID] = str(os.getpid())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "d2compiler", *argv]
        try:
            status = subprocess.run(command, env=env, preexec_fn=die_with_parent).returncode
        except KeyboardInterrupt:
            return 130
        if status == 0:
            return 0
        reports = sorted(Path(errors).glob("rank-*"), key=lambda p: p.stat().st_mtime)
        if not reports:
            raise D2Error(f"torchrun exited with status {status} and no process reported an error (see its output above)")
        first = reports[0].read_text().splitlines()
        print(first[1] if len(first) > 1 else "error: a process failed", file=sys.stderr)
        return int(first[0]) if first and first[0].isdigit() else 1


def report_error(status: int, line: str) -> str:
    """Under torchrun: prefix the error line with the process's rank, and leave it (with the exit
    status) where the launcher looks. Returns the line to print."""
    rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    if rank is None or size == "1":
        return line
    prefix = f"process {rank} of {size}: "
    line = line.replace("error: ", "error: " + prefix, 1) if line.startswith("error: ") else prefix + line
    folder = os.environ.get(ERROR_DIR)
    if folder:
        try:
            (Path(folder) / f"rank-{rank}").write_text(f"{status}\n{line}\n")
        except OSError:
            pass
    return line
