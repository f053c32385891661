"""`--until` of the benchmark tables (`bench/quality.py`, `bench/moe.py`, `bench/moe_allocation.py`): a
long table stops between configurations in time to finish by a given clock time, never inside one."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

WORKER = """import json, sys, time
cfg = json.loads(sys.argv[2])
time.sleep(cfg["sleep"])
print("RESULT " + json.dumps({**cfg, "key": cfg["name"]}))
"""


def test_clock_time_means_its_next_occurrence() -> None:
    now = datetime.datetime(2026, 12, 7, 18, 0)
    assert quality.parse_until("19:40", now) == datetime.datetime(2026, 12, 7, 19, 40).timestamp()
    assert quality.parse_until("7:05", now) == datetime.datetime(2026, 12, 8, 7, 5).timestamp()
    assert quality.parse_until("2026-12-09T01:30", now) == datetime.datetime(2026, 12, 9, 1, 30).timestamp()


@pytest.mark.parametrize("text", ["25:00", "tomorrow", "19-40", ""])
def test_a_bad_time_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="quality.py")
    quality.add_until_flag(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--until", text])
    assert stop.value.code == 2
    assert "--until: expected HH:MM" in capsys.readouterr().err


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configs: list[dict], until: float | None) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setattr(quality, "stamp", lambda record: record)  # no git or data digests here
    out = tmp_path / "results.json"
    code = quality.run_workers(str(script), configs, out, lambda cfg: cfg["name"], lambda records: "table\n",
                               lambda record: f"done {record['key']}", until=until)
    assert code == 0
    return [r["key"] for r in quality.load_results(out)]


def test_without_until_every_configuration_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = [{"name": name, "sleep": 0.0} for name in "abc"]
    assert _run(tmp_path, monkeypatch, configs, None) == ["a", "b", "c"]


def test_a_time_already_past_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    configs = [{"name": name, "sleep": 0.0} for name in "abc"]
    assert _run(tmp_path, monkeypatch, configs, time.time() - 1) == []
    assert "stopped before 3 of 3 configurations" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()


def test_a_configuration_starts_only_if_the_longest_so_far_would_still_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The second configuration would start before the deadline, but one more second-long run would end
    after it: it is left, with the first one's record written whole."""
    configs = [{"name": name, "sleep": 1.0} for name in "abc"]
    assert _run(tmp_path, monkeypatch, configs, time.time() + 1.8) == ["a"]
    out = capsys.readouterr().out
    assert "done a" in out and "stopped before 2 of 3 configurations" in out
    assert json.loads((tmp_path / "results.json").read_text())[0]["key"] == "a"
