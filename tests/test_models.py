"""Model sources: folders, bare safetensors, GGUF, and clear errors for bad ones."""

from __future__ import annotations

import shutil

import pytest
import torch

from d2compiler.errors import ModelLoadError
from d2compiler.loading.models import load_model, smollm2_gguf_path


def test_safetensors_file_source(tiny_models):
    loaded = load_model(str(tiny_models["llama"] / "model.safetensors"), "float32", "cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.tokenizer is not None


def test_bad_sources(tmp_path, tiny_models):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "missing"), "float32", "cpu")
    with pytest.raises(ModelLoadError, match="not a transformers folder"):
        load_model(str(tmp_path), "float32", "cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_models["llama"] / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(ModelLoadError, match="needs a config.json beside it"):
        load_model(str(bare / "model.safetensors"), "float32", "cpu")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"), "float32", "cpu")
    with pytest.raises(ModelLoadError, match="unknown builtin"):
        load_model("builtin:gpt5", "float32", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_model(str(tiny_models["llama"]), "float32", "cuda")


@pytest.mark.slow
def test_gguf_source_dequantizes_real_smollm2():
    loaded = load_model(str(smollm2_gguf_path()), "float32", "cpu")
    model = loaded.model
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model, "hf_quantizer", None) is None


def test_builtin_minilm_is_the_real_encoder(capsys):
    from d2compiler.cli import main

    loaded = load_model("builtin:all-minilm-l6-v2", "float32", "cpu")
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.config.num_hidden_layers == 6
    assert loaded.tokenizer("a sentence").input_ids[0] == loaded.tokenizer.cls_token_id
    assert main(["inspect", "builtin:all-minilm-l6-v2"]) == 0
    out = capsys.readouterr().out
    assert "blocks: encoder.layer x 6 (BertLayer)" in out
    for local, role in [("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
                        ("attention.output.dense", "o"), ("intermediate.dense", "up"), ("output.dense", "down")]:
        assert any(line.split()[:3] == [local, "Linear", role] for line in out.splitlines() if line.strip()), local


def test_a_gguf_conversion_is_keyed_by_content(tmp_path, monkeypatch):
    """The same GGUF bytes under a new path (a reinstalled package) reuse the cached conversion; an
    edited file gets its own; a known path, size and mtime is not hashed again; stale conversions of
    the same name go."""
    import os

    from d2compiler.loading import content_key as keys
    from d2compiler.loading import models

    monkeypatch.setenv("D2C_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    os.utime(second, ns=(1, 1))  # another mtime, as a reinstall gives
    stale = tmp_path / "cache" / "converted" / "model-0123456789abcdef"  # keyed by path and mtime (earlier versions)
    _fake_conversion(stale)
    converted = []
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, target: converted.append(target) or _fake_conversion(target))
    assert models.gguf_folder(first) == models.gguf_folder(second) and len(converted) == 1
    assert not stale.exists()  # a conversion removes those of the same name whose source is gone or changed
    hashed = []
    real = keys.file_sha256
    monkeypatch.setattr(keys, "file_sha256", lambda path: hashed.append(path) or real(path))
    models.gguf_folder(first)
    assert not hashed  # remembered by path, size and mtime
    second.write_bytes(b"GGUF" + bytes(64))
    assert models.gguf_folder(second) != models.gguf_folder(first) and len(converted) == 2 and hashed == [second]
    assert all(folder.is_dir() for folder in converted)  # both sources exist: both conversions stay


def _fake_conversion(target):
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
