"""`d2c run --nproc N` cannot run away (issue 26, group 1): N is bounded by the cores, the GPUs and
the memory the plan estimates per process, before any process starts; and killing the launcher
while its processes are still starting leaves none behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2compiler.cli import main
from d2compiler.driver import launch as launch_module
from d2compiler.driver import process_limit

from .conftest import write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'


@pytest.fixture
def recipe(tmp_path, tiny_models) -> Path:
    return write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), SPARSEGPT, samples=4, seq_len=32,
                        output=tmp_path / "out")


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a process would be started."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a process was started")
    monkeypatch.setattr(launch_module, "launch", refuse)


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_more_processes_than_cores_is_refused_before_any_starts(recipe, no_launch, capsys):
    cores = process_limit.usable_cores()
    assert main(["--quiet", "run", str(recipe), "--nproc", str(cores + 1)]) == 2
    line = last_error(capsys)
    assert f"--nproc {cores + 1}: this machine has {cores} CPU core(s)" in line and "--oversubscribe" in line
    assert not (recipe.parent / "out").exists()


def test_more_processes_than_memory_is_refused(recipe, no_launch, monkeypatch, capsys):
    monkeypatch.setattr(process_limit, "usable_cores", lambda: 64)
    monkeypatch.setattr(process_limit, "available_memory_mb", lambda: 1.0)
    assert main(["--quiet", "run", str(recipe), "--nproc", "2"]) == 2
    line = last_error(capsys)
    assert "each process needs about" in line and "1 MiB is available" in line and "--oversubscribe" in line


def test_more_processes_than_gpus_is_refused_even_oversubscribed(recipe, no_launch, monkeypatch, capsys):
    import torch

    from d2compiler.loading import dtypes

    monkeypatch.setattr(dtypes, "resolve_device", lambda _device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--quiet", "run", str(recipe), "--nproc", "2", "--oversubscribe"]) == 2
    assert "--nproc 2: this machine has 1 GPU(s) and each process takes one" in last_error(capsys)


def test_oversubscribe_lifts_the_core_and_memory_limits(recipe, monkeypatch):
    started = []
    monkeypatch.setattr(launch_module, "launch", lambda nproc, argv: started.append(nproc) or 0)
    monkeypatch.setattr(process_limit, "available_memory_mb", lambda: 1.0)
    nproc = process_limit.usable_cores() + 1
    assert main(["--quiet", "run", str(recipe), "--nproc", str(nproc), "--oversubscribe"]) == 0
    assert started == [nproc]


def processes_with(marker: str, *, unless: str = "\0") -> list[int]:
    """PIDs of the live processes whose command line contains `marker` (and not `unless`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and unless not in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def kill_launcher_while_starting(recipe: Path) -> None:
    """Run `d2c run RECIPE --nproc 2` under this process, made a child subreaper (as a container's
    init is: orphans come to it, not to PID 1), and SIGKILL the launcher as soon as the first of its
    processes exists (it is still importing torch). Then reap for up to 30 s; exit 1 if any process
    of the run is still alive."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    launcher = subprocess.Popen([sys.executable, "-m", "d2compiler", "--quiet", "run", str(recipe), "--nproc", "2",
                                 "--oversubscribe"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = f"-m d2compiler --quiet run {recipe}"  # torchrun starts `python -u -m d2compiler ...` (and has it in its own line)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if [pid for pid in processes_with(worker, unless="torch.distributed.run") if pid != launcher.pid]:
            break
        time.sleep(0.002)
    assert launcher.poll() is None, "the run ended before a process started"
    launcher.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes_with(str(recipe)) and time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.1)
    left = processes_with(str(recipe))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    sys.exit(1 if left else 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux")
def test_killing_the_launcher_while_processes_start_leaves_none(recipe):
    """The processes die with torchrun, which dies with the launcher, even before they import torch
    and even where orphans do not go to PID 1."""
    script = f"from tests.test_hostile_processes import kill_launcher_while_starting as k; k({str(recipe)!r})"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
