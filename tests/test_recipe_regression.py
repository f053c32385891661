"""Behaviour stays the same across refactors and machines: every shipped recipe, run on a tiny model
with a few calibration windows, gives the weights recorded in tests/recipe_fingerprints.json.

Why not a hash: a bit-exact `weights_sha256` depends on which kernels a CPU runs (AVX2 vs AVX512,
thread count, summation order) and failed on every machine but the one that wrote it. What we pin
instead is a *fingerprint* of each tensor of the pruned model, compared with a tolerance:

- the number of exact zeros: the mask. A mask decision flips only where two scores tie to within
  float32 rounding, so a handful of flips per tensor is noise; a different sparsity moves thousands.
- the Frobenius norm and four seeded bilinear sketches uᵀWv (float64, u and v fixed per shape): any
  change of the surviving weights (another update rule, refit steps, quantization grid) moves them
  by far more than rounding does.

The tolerances are not guessed: `python -m tests.test_recipe_regression write` reruns every recipe
in the ways the last bits change on one machine (one thread; generic, non-vectorised kernels; AVX2
kernels, which is why it is written on an AVX512 machine; every input weight moved by one ulp) and
records the largest difference it sees. A tensor's tolerance is
`SAFETY` times that measured noise (with floors so that a zero noise does not demand bit-equality),
and `test_guard_catches_*` shows that a sparsity changed by 0.01 and a changed update rule exceed
it. Everything the run depends on is built here from seeded `torch.rand` draws (weights, token
windows), not from a library's initialiser or a corpus that differs between Python versions.

`python -m tests.test_recipe_regression write` rewrites the reference: run it only when a change is
meant to alter results, and say why in the commit. `write NAME.toml ...` (re)writes only those recipes'
entries, e.g. for a newly shipped recipe; the others keep theirs (it refuses on another torch or CPU
than the one that wrote the file)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINTS = Path(__file__).with_name("recipe_fingerprints.json")
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))
SKETCHES = 4
VOCAB = 512
SEQ_LEN = 64
WINDOWS = 4
SAFETY = 20.0
# Floors: a tolerance never asks for less than this, even where the measured noise was zero. A mask
# may differ in 0.2% of a tensor's entries (a sparsity changed by 0.01 moves 1%), the norm and the
# sketches by 1e-4 of the norm (float32 rounding of one tensor is ~1e-7).
MIN_ZERO_FRACTION = 0.002
MIN_RELATIVE = 1e-4

Fingerprint = dict[str, dict[str, Any]]


def recipe_kind(name: str) -> str:
    return "vit" if "vit" in name else "bert" if "minilm" in name else "llama"


def seeded_uniform(shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    """Uniform in [-scale, scale): from torch's CPU generator, identical on every machine."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(scale).float()


def tiny_model(kind: str) -> torch.nn.Module:
    """A tiny llama, BERT or ViT whose every weight and bias is a seeded uniform draw (std 0.02);
    norm weights stay at one. Independent of transformers' initialisers."""
    import transformers as tf

    from .conftest import tiny_config

    config = tiny_config(kind, VOCAB)
    config._attn_implementation = "sdpa"
    if kind == "vit":
        model = tf.ViTForImageClassification(config)
    else:
        model = (tf.LlamaForCausalLM if kind == "llama" else tf.BertModel)(config)
    with torch.no_grad():
        for seed, (name, param) in enumerate(sorted(model.named_parameters())):
            if param.dim() >= 2 or name.endswith("bias"):
                param.copy_(seeded_uniform(tuple(param.shape), seed, 0.02 * math.sqrt(3)))
    return model.float().eval()


def token_windows(folder: Path) -> Path:
    """WINDOWS seeded random windows of SEQ_LEN ids as a pre-tokenized calibration file."""
    from safetensors.torch import save_file

    path = folder / "windows.safetensors"
    if not path.exists():
        ids = torch.randint(0, VOCAB, (WINDOWS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, str(path))
    return path


def tiny_recipe(name: str, windows: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped recipe `name` on the tiny model of its kind with WINDOWS calibration windows, no
    evaluation and no output. `overrides`: pass type -> fields to change (the deliberate changes)."""
    data = tomllib.loads((ROOT / "recipes" / name).read_text())
    kind = recipe_kind(name)
    data["model"] |= {"source": f"tiny-{kind}", "device": "cpu", "dtype": "float32", "streaming": False}
    calibration = data["data"]["calibration"]
    if kind != "vit":
        calibration |= {"source": str(windows), "seq_len": SEQ_LEN}
    calibration["samples"] = WINDOWS
    data["data"].pop("evaluation", None)
    data.pop("output", None)
    for p in data["passes"]:
        p.update((overrides or {}).get(p["type"], {}))
    return data


def fingerprint(model: torch.nn.Module) -> Fingerprint:
    """Per floating tensor (parameters and buffers, packed 2:4 layers unpacked): zeros, norm, sketches."""
    from d2compiler.graph.packing import unpack_linears

    unpack_linears(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    out: Fingerprint = {}
    for name in sorted(tensors):
        t = tensors[name].detach()
        if not t.is_floating_point():
            continue
        w = t.double().reshape(t.shape[0], -1) if t.dim() else t.double().reshape(1, 1)
        seed = w.shape[0] * 100_003 + w.shape[1]
        u = seeded_uniform((SKETCHES, w.shape[0]), seed, 1.0).double()
        v = seeded_uniform((SKETCHES, w.shape[1]), seed + 1, 1.0).double()
        out[name] = {"size": t.numel(), "zeros": int((t == 0).sum()), "norm": float(w.norm()),
                     "sketch": [float(x) for x in torch.einsum("ki,ij,kj->k", u, w, v)]}
    return out


def run_recipe(name: str, windows: Path, overrides: dict[str, Any] | None = None, nudge: bool = False) -> Fingerprint:
    """Compress the tiny model with `name` and fingerprint the result. `nudge`: move every input
    weight by one ulp first (the noise probe)."""
    from d2compiler.driver.pipeline import compress
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    model = tiny_model(recipe_kind(name))
    if nudge:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.nextafter(param, torch.full_like(param, math.inf)))
    loaded = LoadedModel(model, tokenizer=None, source=f"tiny-{recipe_kind(name)}")
    compress(validate_recipe(tiny_recipe(name, windows, overrides)), loaded=loaded, quiet=True)
    return fingerprint(model)


def differences(got: Fingerprint, want: Fingerprint) -> dict[str, dict[str, float]]:
    """Per tensor: zero-count change, relative norm change, largest sketch change relative to the norm."""
    assert got.keys() == want.keys(), f"tensors differ: {sorted(got.keys() ^ want.keys())}"
    out = {}
    for name, w in want.items():
        g, scale = got[name], max(w["norm"], 1e-12)
        out[name] = {"zeros": abs(g["zeros"] - w["zeros"]), "norm": abs(g["norm"] - w["norm"]) / scale,
                     "sketch": max(abs(a - b) for a, b in zip(g["sketch"], w["sketch"])) / scale}
    return out


def violations(got: Fingerprint, reference: dict[str, Any]) -> list[str]:
    """Each tensor whose difference from the reference exceeds SAFETY × the measured noise."""
    noise = reference["noise"]
    found = []
    for name, diff in differences(got, reference["fingerprint"]).items():
        n = noise.get(name, {})
        limits = {"zeros": max(MIN_ZERO_FRACTION * reference["fingerprint"][name]["size"], SAFETY * n.get("zeros", 0)),
                  "norm": max(MIN_RELATIVE, SAFETY * n.get("norm", 0.0)),
                  "sketch": max(MIN_RELATIVE, SAFETY * n.get("sketch", 0.0))}
        found += [f"{name}: {key} differs by {diff[key]:.3g} (tolerance {limits[key]:.3g})"
                  for key in limits if diff[key] > limits[key]]
    return found


def reference(name: str) -> dict[str, Any]:
    recorded = json.loads(FINGERPRINTS.read_text())["recipes"]
    assert name in recorded, f"{name} has no reference: run python -m tests.test_recipe_regression write"
    return recorded[name]


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> Path:
    return token_windows(tmp_path_factory.mktemp("windows"))


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_matches_reference(name, windows):
    wrong = violations(run_recipe(name, windows), reference(name))
    assert not wrong, f"{name} changed behaviour:\n" + "\n".join(wrong[:20])


DELIBERATE_CHANGES = [  # (recipe, pass type -> fields, whether the mask changes too)
    ("default.toml", {"dual_taylor_mask": {"sparsity": 0.51}}, True),
    ("d2prune-unstructured-50.toml", {"dual_taylor_mask": {"sparsity": 0.51}}, True),
    ("wanda-unstructured-50.toml", {"wanda": {"sparsity": 0.49}}, True),
    ("d2prune-2of4.toml", {"attention_kl_update": {"strategy": "fixed"}}, False),  # another update rule
    ("sparsegpt-refit-2of4.toml", {"sparsegpt": {"refit_steps": 3}}, False),  # a shorter refit
]


@pytest.mark.parametrize(("name", "change", "mask_changes"), DELIBERATE_CHANGES,
                         ids=[f"{name}:{json.dumps(change)}" for name, change, _ in DELIBERATE_CHANGES])
def test_guard_catches_a_deliberate_change(name, change, mask_changes, windows):
    wrong = violations(run_recipe(name, windows, change), reference(name))
    assert wrong, f"{name} with {change} passed the guard"
    assert any(": zeros differs" in line for line in wrong) == mask_changes, wrong


# ---- writing the reference ------------------------------------------------------------------------

# Each probe reruns every recipe in one way the last bits change between machines. The reference is
# written on an AVX512 machine, so that `avx2_kernels` measures what an AVX2 machine computes (on an
# AVX2 machine it changes nothing: the ADMM recipes, whose support choice amplifies rounding, then
# failed on AVX512 machines with a reference written on AVX2, 2026-12-07).
NOISE_PROBES: dict[str, dict[str, str]] = {
    "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "generic_kernels": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2_kernels": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "ulp_nudge": {"D2C_REGRESSION_NUDGE": "1"},
}
WRITE_ON = "AVX512"  # the CPU capability the reference is written on (see NOISE_PROBES)


def fingerprints_here(folder: Path, names: list[str]) -> dict[str, Fingerprint]:
    nudge = os.environ.get("D2C_REGRESSION_NUDGE") == "1"
    return {name: run_recipe(name, token_windows(folder), nudge=nudge) for name in names}


def machine() -> dict[str, Any]:
    import platform

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(), "probes": NOISE_PROBES}


def main(argv: list[str]) -> None:
    """`write [NAME.toml ...]`: fingerprint every recipe (or only those named) here, measure the noise
    under NOISE_PROBES (each in its own process) and write tests/recipe_fingerprints.json (keeping the
    other recipes' entries). `dump FILE NAME...`: write this process's fingerprints of those recipes to
    FILE (what each probe runs)."""
    import tempfile

    command = argv[0] if argv else "write"
    names = argv[1:] if command == "write" else argv[2:]
    unknown = sorted(set(names) - set(RECIPES))
    if command not in ("write", "dump") or unknown:
        raise SystemExit(f"usage: python -m tests.test_recipe_regression write [NAME.toml ...] (not recipes/: {unknown})")
    names = names or RECIPES
    if command == "write" and torch.backends.cpu.get_cpu_capability() != WRITE_ON:
        raise SystemExit(f"write the reference on an {WRITE_ON} machine (this one runs "
                         f"{torch.backends.cpu.get_cpu_capability()}): its avx2_kernels probe then measures "
                         "what AVX2 machines compute")
    recorded: dict[str, Any] = {}
    if command == "write" and names != RECIPES:
        old = json.loads(FINGERPRINTS.read_text())
        if old["written_on"] != machine():
            raise SystemExit(f"{FINGERPRINTS.name} was written on {old['written_on']}, this is {machine()}: "
                             "rewrite every recipe (write with no names)")
        recorded = old["recipes"]
    with tempfile.TemporaryDirectory() as tmp:
        if command == "dump":
            Path(argv[1]).write_text(json.dumps(fingerprints_here(Path(tmp), names)))
            return
        here = fingerprints_here(Path(tmp), names)
        noise: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
        for probe, env in NOISE_PROBES.items():
            out = Path(tmp) / f"{probe}.json"
            subprocess.run([sys.executable, "-m", "tests.test_recipe_regression", "dump", str(out), *names],
                           cwd=ROOT, env=os.environ | env, check=True)
            probed = json.loads(out.read_text())
            for name in names:
                for tensor, diff in differences(probed[name], here[name]).items():
                    worst = noise[name].setdefault(tensor, {"zeros": 0, "norm": 0.0, "sketch": 0.0})
                    for key, value in diff.items():
                        worst[key] = max(worst[key], value)
            print(f"{probe}: largest zero flips {max(d['zeros'] for n in noise.values() for d in n.values())}, "
                  f"relative sketch {max(d['sketch'] for n in noise.values() for d in n.values()):.3g}")
    recipes = recorded | {name: {"fingerprint": here[name], "noise": noise[name]} for name in names}
    recipes = {name: recipes[name] for name in RECIPES if name in recipes}
    FINGERPRINTS.write_text(json.dumps({"written_on": machine(), "recipes": recipes}, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
