"""A Mixture-of-Experts built from a dense Llama by "upcycling" its MLPs (no MoE checkpoint can be
downloaded here), written once to the cache (`$D2C_CACHE/upcycled/`), never to git.

The rule (seeded, so the same arguments give the same weights):
- the model is a Mixtral (Llama attention, norms and embeddings copied as they are; the
  transformers-5 layout of 3-D expert banks `mlp.experts.gate_up_proj` [E, 2I, H] and
  `mlp.experts.down_proj` [E, H, I]; top-k softmax routing renormalised over the k chosen);
- expert e of layer l is the dense MLP plus Gaussian noise of `noise` × the standard deviation of
  each matrix (generator seed `seed · 1000 + l · E + e`), so the experts differ a little;
- the router rows of layer l are the E unit centroids of spherical k-means (25 Lloyd iterations,
  generator seed `seed`, first centroids E distinct random inputs) of that layer's MLP inputs on the
  first windows of `builtin:python-docs` (not the calibration or evaluation text): a token goes to
  the experts whose centroid directions are nearest its own.

With near-copies as experts the dense MoE computes almost what the dense model does (its perplexity
is reported beside it); what changes for pruning is that each expert sees only the tokens routed to it.

    python bench/upcycle.py            # prints the folder (builds it the first time, a few minutes)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import lm_source, parse, pick, seq_len  # noqa: E402

KMEANS_ITERATIONS = 25


def spherical_kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k unit centroids of the rows of `x` (n, d) by cosine similarity; an emptied cluster restarts
    at the row least similar to its centroid."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(KMEANS_ITERATIONS):
        similarity = x @ centroids.T
        assign = similarity.argmax(dim=1)
        for e in range(k):
            members = x[assign == e]
            if len(members):
                centroids[e] = torch.nn.functional.normalize(members.sum(0), dim=0)
            else:
                centroids[e] = x[similarity.max(dim=1).values.argmin()]
    return centroids.float()


def mlp_inputs(model: Any, tokenizer: Any, windows: int, length: int) -> list[torch.Tensor]:
    """Each layer's MLP inputs (tokens, hidden) over the first `windows` windows of builtin:python-docs."""
    from d2compiler.evaluation.data import evaluation_windows, leading_tokens

    ids = leading_tokens(tokenizer, "builtin:python-docs", "calibration", windows * length)
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for window in evaluation_windows(ids, length, windows):
                model(window)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in captured]


def moe_config(dense: Any, experts: int, top_k: int) -> Any:
    import transformers

    c = dense.config
    return transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=experts, num_experts_per_tok=top_k,
        sliding_window=None,
    )


def upcycle(dense: Any, tokenizer: Any, experts: int, top_k: int, noise: float, seed: int) -> Any:
    """The MoE of the module docstring's rule, from the dense causal LM `dense`."""
    import transformers

    torch.manual_seed(seed)
    moe = transformers.MixtralForCausalLM(moe_config(dense, experts, top_k)).eval()
    state = dense.state_dict()
    inputs = mlp_inputs(dense, tokenizer, pick(8, 2), seq_len())
    with torch.no_grad():
        for name, value in moe.state_dict().items():
            if ".mlp." not in name:
                value.copy_(state[name])
        for index, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[index].mlp
            gate, up, down = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            for e in range(experts):
                g = torch.Generator().manual_seed(seed * 1000 + index * experts + e)
                near = [w + noise * w.std() * torch.randn(w.shape, generator=g) for w in (gate, up, down)]
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat(near[:2]))
                layer.mlp.experts.down_proj[e].copy_(near[2])
            layer.mlp.gate.weight.copy_(spherical_kmeans(inputs[index], experts, torch.Generator().manual_seed(seed)))
    return moe


def upcycled_moe(experts: int = 8, top_k: int = 2, noise: float = 0.01, seed: int = 0) -> Path:
    """The folder of the upcycled MoE of `lm_source()` (built and cached the first time)."""
    from d2compiler.loading.models import cache_dir, load_model

    source = lm_source()
    spec = {"source": source, "experts": experts, "top_k": top_k, "noise": noise, "seed": seed,
            "kmeans": f"python-docs x{pick(8, 2)} spherical {KMEANS_ITERATIONS}", "rule": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = (Path(source).parent / "upcycled" if pick(False, True) else cache_dir() / "upcycled") / f"moe-e{experts}-top{top_k}-{key}"
    if (target / "config.json").is_file():
        return target
    loaded = load_model(source, "float32", "cpu")
    moe = upcycle(loaded.model.eval(), loaded.tokenizer, experts, top_k, noise, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        moe.save_pretrained(tmp, max_shard_size="1GB")
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "upcycled.json").write_text(json.dumps(spec, indent=1) + "\n")
        if not target.exists():
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    parse(__doc__)
    print(upcycled_moe())
