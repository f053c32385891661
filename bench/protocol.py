"""The benchmark protocol every script in bench/ shares, its smoke variant, and result provenance.

Full protocol: SmolLM2-135M (`builtin:smollm2-135m`), calibration on the first windows of 512 tokens
of ../shared/data/c4, perplexity on the first windows of 512 tokens of WikiText-2 (test, or valid for
tuning). Results go to bench/results/.

Smoke (`--smoke` on any script): the same code path on a tiny random Llama (and a tiny BERT where an
encoder is needed) with a few 32-token windows of `builtin:python-docs`, writing into a temporary
folder, never into bench/results/. The choice travels to child processes through the environment
(`D2C_BENCH_SMOKE` names the temporary folder).

Every results file records `provenance`: the git commit (or the package version), whether the tree
was dirty, the command that produced it, and the sha256 of the protocol's data files (`data`: C4 and
WikiText-2 test/valid in a full run, the `pydoc_data` module in a smoke run) and of any file a
script declares with `uses(path)` (e.g. zero-shot task files).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
C4 = SHARED / "c4" / "c4_demo_llamafactory.jsonl"
WIKI = {"test": SHARED / "wikitext-2-raw-v1" / "wiki.test.raw", "valid": SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw"}
SMOLLM2 = "builtin:smollm2-135m"
MINILM = "builtin:all-minilm-l6-v2"
SMOKE_ENV = "D2C_BENCH_SMOKE"
SMOKE_SEQ_LEN = 32


def add_smoke_flag(parser: Any) -> None:
    parser.add_argument("--smoke", action="store_true", help="the same code path on a tiny random model with a few "
                        "tokens; results go to a temporary folder, never to bench/results/")


def parse(doc: str | None, parser: Any = None) -> Any:
    """A script's arguments: `parser` (default: one described by `doc`) with --smoke added, parsed,
    and the run started (`start`)."""
    import argparse

    parser = parser or argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    return args


def start(smoke: bool) -> None:
    """Call first in a script's main: with `smoke`, make a temporary folder for this run (children inherit it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if smoke and not os.environ.get(SMOKE_ENV):
        os.environ[SMOKE_ENV] = tempfile.mkdtemp(prefix="d2c-bench-smoke-")
        print(f"smoke run: results in {results_dir()}", flush=True)


def smoke() -> bool:
    return bool(os.environ.get(SMOKE_ENV))


def _smoke_root() -> Path:
    return Path(os.environ[SMOKE_ENV])


def results_dir() -> Path:
    folder = _smoke_root() / "results" if smoke() else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def work_dir(name: str) -> Path:
    """Where a script keeps models it writes (out/NAME, or inside the smoke folder)."""
    return (_smoke_root() / "out" if smoke() else ROOT / "out") / name


def pick(full: Any, tiny: Any) -> Any:
    """`full` in a real run, `tiny` in a smoke run."""
    return tiny if smoke() else full


def seq_len() -> int:
    return pick(512, SMOKE_SEQ_LEN)


def _tiny(name: str) -> str:
    """A tiny random model in the smoke folder (built once per smoke run)."""
    folder = _smoke_root() / "models" / name
    if not (folder / "config.json").is_file():
        import transformers

        from d2compiler.evaluation.synthetic import save_random_model, tiny_llama_config, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        if name == "llama":
            config = tiny_llama_config(len(tokenizer))
            save_random_model(config, folder, tokenizer)
        else:
            config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
            save_random_model(config, folder, tokenizer, model_class=transformers.AutoModel)
    return str(folder)


def lm_source() -> str:
    """The causal LM: SmolLM2-135M, or a tiny random Llama."""
    return _tiny("llama") if smoke() else SMOLLM2


def encoder_source() -> str:
    """The sentence encoder: all-MiniLM-L6-v2, or a tiny random BERT."""
    return _tiny("bert") if smoke() else MINILM


def calibration_source(name: str = "c4") -> str:
    return "builtin:python-docs" if smoke() or name != "c4" else str(C4)


def evaluation_source(split: str = "test") -> str:
    return "builtin:python-docs" if smoke() else str(WIKI[split])


_USED: list[Path] = []  # data files a script declares beyond the protocol's (`uses`)


def uses(path: str | Path) -> None:
    """Declare a data file this run reads, so that its sha256 goes into the provenance (call before
    the first `provenance()`)."""
    _USED.append(Path(path))


def data_digests() -> dict[str, str]:
    """sha256 of the protocol's data files (those present) and of the declared ones, by path."""
    import hashlib

    if smoke():
        import pydoc_data.topics

        files = [Path(pydoc_data.topics.__file__)]
    else:
        files = [C4, WIKI["test"], WIKI["valid"]]
    out = {}
    for path in [*files, *_USED]:
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[str(path.relative_to(ROOT.parent)) if path.is_relative_to(ROOT.parent) else str(path)] = digest.hexdigest()
    return out


@cache
def provenance() -> dict[str, Any]:
    """The commit (or package version), a dirty flag (uncommitted changes outside bench/results), the
    command of this run and the sha256 of its data files (`data_digests`); computed once, when first
    asked."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        import d2compiler

        commit = f"d2compiler {d2compiler.__version__}"
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    script = Path(sys.argv[0]).resolve()
    shown = f"bench/{script.name}" if script.parent == ROOT / "bench" else sys.argv[0]
    command = " ".join(["python", shlex.quote(shown), *(shlex.quote(a) for a in sys.argv[1:])])
    return {"commit": commit, "dirty": bool(status), "command": command, "smoke": smoke(), "data": data_digests(),
            "machine": machine()}


def machine() -> dict[str, Any]:
    """The hardware a run measured on (its times compare only with runs on the same): the CPU's model
    name, the cores this process may use, torch's CPU kernel level (e.g. AVX512, AVX2) and the GPU,
    if torch sees one."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": name, "cores": cores, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": gpu}


def write_json(path: Path, data: Any) -> None:
    """Write a results file with its provenance (a dict gets a `provenance` key; each record of a list
    made in this run gets one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        data = {**data, "provenance": provenance()}
    path.write_text(json.dumps(data, indent=1) + "\n")


def publish(name: str, record: dict[str, Any], text: str) -> None:
    """Write results NAME.json (with provenance) and NAME.md (`text`), and print the markdown."""
    write_json(results_dir() / f"{name}.json", record)
    (results_dir() / f"{name}.md").write_text(text)
    print(text)


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """A record of an accumulating results list, with this run's provenance."""
    return {**record, "provenance": provenance()}


def provenance_line(prov: dict[str, Any] | None) -> str:
    """One markdown line naming the commit and command of a results file."""
    if not prov:
        return "Provenance: not recorded (produced before results carried their commit)."
    dirty = " (with uncommitted changes)" if prov.get("dirty") else ""
    return f"Produced at commit `{prov['commit'][:12]}`{dirty} by `{prov['command']}`."


def run_job(cmd: list[str]) -> tuple[dict[str, Any], float]:
    """Run a benchmark job in its own process (from the repository root) and return the JSON of its
    last `RESULT {...}` line and its wall time; a failed job stops the benchmark with its stderr."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"job failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):]), wall


def phase_seconds(record: dict[str, Any]) -> dict[str, float]:
    """A run record's time per phase (observe, each pass, propagate, total), summed over its blocks."""
    phases: dict[str, float] = {}
    for block in record["blocks"]:
        for phase, seconds in block["times_s"].items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    return phases
