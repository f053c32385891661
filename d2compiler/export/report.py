"""`report.html`: a static page beside `sparsity.json` with matplotlib PNGs (in `report/`) of
per-layer sparsity and reconstruction error, attention KL per block (when computed), time and
memory per block, and a results table with dense vs pruned perplexity. Everything it shows comes
from the run's `sparsity.json` record, so `write_report` can also rebuild a report later."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

ROLE_COLOURS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "o": "#d62728", "gate": "#9467bd",
                "up": "#8c564b", "down": "#e377c2", "qkv": "#17becf", "gate_up": "#bcbd22", "other": "#7f7f7f"}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>d2compiler report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f4f4f4}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}</style>
</head><body>
<h1>d2compiler report</h1>
<p>{title}</p>
<h2>Results</h2>
{summary}
{figures}
<h2>Layers</h2>
{layers}
<script>
window.addEventListener("load", function () {{
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _figures(record: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    """Draw the PNGs into `folder`; return (title, file name) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = record.get("layers", {})
    names = sorted(layers, key=lambda n: (layers[n].get("block", 0), n))
    colours = [ROLE_COLOURS.get(layers[n].get("role", "other"), "#7f7f7f") for n in names]
    blocks = record.get("blocks", [])
    out: list[tuple[str, str]] = []

    def save(fig: Any, title: str, file: str) -> None:
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(folder / file, dpi=90)
        plt.close(fig)
        out.append((title, file))

    if names:
        for key, title, file, log in (("sparsity", "Sparsity per layer", "sparsity.png", False),
                                      ("recon_error", "Relative reconstruction error ‖(W−W′)X‖²/‖WX‖² per layer", "recon_error.png", True)):
            values = [layers[n].get(key) for n in names]
            if any(v is not None for v in values):
                fig, ax = plt.subplots(figsize=(11, 3.2))
                ax.bar(range(len(names)), [v or 0.0 for v in values], color=colours, width=1.0)
                ax.set_xlabel("layer (in block order; colour = role)")
                ax.set_ylabel(key)
                if log and any(v is not None and v > 0 for v in values):
                    ax.set_yscale("log")
                handles = [plt.Rectangle((0, 0), 1, 1, color=c) for r, c in ROLE_COLOURS.items() if any(layers[n].get("role") == r for n in names)]
                labels = [r for r in ROLE_COLOURS if any(layers[n].get("role") == r for n in names)]
                if labels:
                    ax.legend(handles, labels, ncol=len(labels), fontsize=8, loc="lower right", framealpha=0.9)
                save(fig, title, file)
    def per_block(points: list[tuple[int, float]], ylabel: str, title: str, file: str, height: float, marker: str) -> None:
        fig, ax = plt.subplots(figsize=(11, height))
        ax.plot([i for i, _ in points], [v for _, v in points], marker=marker)
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        save(fig, title, file)

    for number, figure in enumerate(record.get("figures", [])):  # declared by the passes (Pass.report_figures)
        per_block([(int(i), float(v)) for i, v in figure["points"]], figure["ylabel"], figure["title"],
                  f"pass_figure_{number}.png", 3, "o")
    if blocks:
        phases = [k for k in dict.fromkeys(k for b in blocks for k in b.get("times_s", {})) if k != "total"]
        fig, ax = plt.subplots(figsize=(11, 3.2))
        bottom = [0.0] * len(blocks)
        for phase in phases:
            vals = [b.get("times_s", {}).get(phase, 0.0) for b in blocks]
            ax.bar([b["index"] for b in blocks], vals, bottom=bottom, label=phase)
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_xlabel("block")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8, ncol=len(phases))
        save(fig, "Time per block, by phase", "time.png")
        rss = [(b["index"], b.get("memory", {}).get("peak_rss_mb")) for b in blocks]
        rss = [(i, v) for i, v in rss if v is not None]
        if rss:
            per_block(rss, "peak RSS so far [MiB]", "Memory: peak resident memory after each block", "memory.png", 2.8, ".")
    return out


def write_report(folder: Path, record: dict[str, Any]) -> Path:
    """Write `folder/report.html` and its PNGs (`folder/report/`) from a sparsity record."""
    images = folder / "report"
    images.mkdir(parents=True, exist_ok=True)
    res = record.get("results", {})
    recipe = record.get("recipe", {})
    title = f"{recipe.get('model', {}).get('source', '?')}: " + " → ".join(p.get("type", "?") for p in recipe.get("passes", []))
    summary = _table(["quantity", "value"], [
        [f"dense {res.get('metric') or 'perplexity'}", res.get("dense", res.get("dense_ppl"))],
        [f"pruned {res.get('metric') or 'perplexity'}", res.get("pruned", res.get("pruned_ppl"))],
        ["evaluation", (res.get("evaluation") or {}).get("source")],
        ["overall sparsity (pruned layers)", record.get("overall_sparsity")], ["patterns", ", ".join(record.get("patterns", []))],
        ["pruning time (s)", res.get("prune_s")], ["wall time (s)", res.get("wall_s")], ["peak RSS (MiB)", res.get("peak_rss_mb")],
        ["device", res.get("device")], ["weights sha256", record.get("weights_sha256")],
    ])
    figures = "".join(f"<h2>{html.escape(t)}</h2><img src=\"report/{f}\" alt=\"{html.escape(t)}\">" for t, f in _figures(record, images))
    layers = record.get("layers", {})
    rows = [[n, m.get("block"), m.get("role"), m.get("pattern"), m.get("sparsity"), m.get("recon_error"), m.get("update"),
             m.get("time_s")] for n, m in sorted(layers.items(), key=lambda kv: (kv[1].get("block", 0), kv[0]))]
    table = _table(["layer", "block", "role", "pattern", "sparsity", "recon. error", "OBS update", "time (s)"], rows)
    path = folder / "report.html"
    path.write_text(_PAGE.format(title=html.escape(title), summary=summary, figures=figures, layers=table), encoding="utf-8")
    return path
