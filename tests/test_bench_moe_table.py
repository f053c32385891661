"""The table of `bench/moe.py`: the read-back columns (expert zeros, router zeros, fewest tokens)
cover every seed of a row, not only its first record."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import moe  # noqa: E402


def _record(recipe: str, mode: str, seed: int, ppl: float, zeros: tuple[float, float], router: float,
            tokens: int) -> dict[str, Any]:
    cfg = {"recipe": recipe, "mode": mode, "seed": seed, "samples": 32, "windows": 32}
    return {**cfg, "key": moe.key(cfg), "ppl": ppl, "wall_s": 1.0, "peak_rss_mb": 1.0, "sparsity": 0.5, "expert_zeros_min": zeros[0],
            "expert_zeros_max": zeros[1], "router_zeros": router, "fewest_expert_tokens": tokens,
            "provenance": {"commit": "abcdef0123"}}


def _cells(text: str, method: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| unstructured-50 | {method} |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_read_back_columns_cover_every_seed_and_mode() -> None:
    records = [
        _record("sparsegpt-unstructured-50", "routed", 0, 50.0, (0.5, 0.5), 0.0, 4),
        _record("sparsegpt-unstructured-50", "routed", 1, 52.0, (0.5, 0.5), 0.0, 3),
        _record("sparsegpt-unstructured-50", "all", 0, 55.0, (0.5, 0.5), 0.0, 16384),
        _record("d2prune-unstructured-50", "routed", 0, 45.0, (0.40, 0.60), 0.0, 7),
        _record("d2prune-unstructured-50", "routed", 1, 46.0, (0.38, 0.61), 0.0, 5),
        _record("d2prune-unstructured-50", "all", 0, 50.0, (0.39, 0.62), 0.25, 16384),
    ]
    text = moe.markdown(records)
    sparsegpt, d2prune = _cells(text, "sparsegpt"), _cells(text, "d2prune")
    assert sparsegpt[-3:] == ["0.5000–0.5000", "0.000", "3"]  # the second seed's 3 tokens, not the first record's 4
    assert d2prune[-3:] == ["0.3800–0.6200", "0.250", "5"]  # zeros over both modes and seeds; tokens over routed only
    assert "a partial table" in text
