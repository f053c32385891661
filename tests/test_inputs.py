"""Image sources, what a model takes, and the metrics beyond perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from d2compiler.cli import main
from d2compiler.errors import DataError
from d2compiler.evaluation.evaluate import make_metric, paragraphs
from d2compiler.evaluation.images import digits, fit_to_model, load_images
from d2compiler.evaluation.inputs import calibration_inputs
from d2compiler.evaluation.model_kind import dummy_input, model_task, takes_images
from d2compiler.evaluation.sources import resolve_source
from d2compiler.execution.runner import ModelRunner
from d2compiler.loading.models import load_model
from d2compiler.recipe.schema import CalibrationData, EvaluationData


def calibration(spec, model):
    return resolve_source(spec, model, "data.calibration")


def evaluation(spec, model):
    return resolve_source(spec, model, "data.evaluation")

def test_digits_parts_are_disjoint_and_fixed():
    cal, ev = digits("calibration"), digits("evaluation")
    assert (len(cal.labels), len(ev.labels)) == (1347, 450)
    assert cal.pixels.shape[1:] == (1, 8, 8) and 0.0 <= float(cal.pixels.min()) and float(cal.pixels.max()) <= 1.0
    flat = {tuple(x.flatten().tolist()) for x in cal.pixels}
    assert sum(tuple(x.flatten().tolist()) in flat for x in ev.pixels) < 10  # sklearn's digits has a few duplicates
    assert torch.equal(digits("evaluation").pixels, ev.pixels)


def test_fit_to_model_resizes_and_repeats_channels():
    class Config:
        image_size, num_channels = 16, 3

    out = fit_to_model(torch.ones(2, 1, 8, 8), Config())
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))


def test_safetensors_image_source(tmp_path):
    path = tmp_path / "images.safetensors"
    save_file({"pixel_values": torch.rand(5, 1, 8, 8), "labels": torch.arange(5)}, str(path))
    images = load_images(str(path), "evaluation")
    assert images.pixels.shape == (5, 1, 8, 8) and images.labels.tolist() == [0, 1, 2, 3, 4]
    save_file({"pixel_values": torch.rand(5, 1, 8, 8), "labels": torch.arange(4)}, str(path))
    with pytest.raises(DataError, match="'labels' must be shaped"):
        load_images(str(path), "evaluation")
    save_file({"images": torch.rand(5, 1, 8, 8)}, str(path))
    with pytest.raises(DataError, match="pixel_values"):
        load_images(str(path), "evaluation")
    with pytest.raises(DataError, match="no such file"):
        load_images(str(tmp_path / "missing.safetensors"), "evaluation")


def test_model_kinds(tiny_models):
    vit = load_model(str(tiny_models["vit"]), "float32", "cpu")
    bert = load_model(str(tiny_models["bert"]), "float32", "cpu")
    gpt2 = load_model(str(tiny_models["gpt2"]), "float32", "cpu")
    assert takes_images(vit.model) and vit.tokenizer is None and dummy_input(vit.model).shape == (1, 1, 8, 8)
    assert [model_task(m.model) for m in (vit, bert, gpt2)] == ["image-classification", "encoder", "causal-lm"]


def test_calibration_inputs_batches_images_and_tokens(tiny_models):
    vit = load_model(str(tiny_models["vit"]), "float32", "cpu")
    batches = calibration_inputs(calibration(CalibrationData(source="builtin:digits", samples=40, batch_size=16), vit.model), vit.model, None)
    assert [b.shape[0] for b in batches] == [16, 16, 8] and batches[0].shape[1:] == (1, 8, 8)
    llama = load_model(str(tiny_models["llama"]), "float32", "cpu")
    windows = calibration_inputs(calibration(CalibrationData(samples=4, seq_len=32, batch_size=2), llama.model), llama.model, llama.tokenizer)
    assert [w.shape for w in windows] == [(2, 32), (2, 32)]


def test_source_and_model_must_match(tiny_models):
    vit = load_model(str(tiny_models["vit"]), "float32", "cpu")
    with pytest.raises(DataError, match="data.calibration.source: ViTForImageClassification takes images"):
        calibration(CalibrationData(), vit.model)
    bert = load_model(str(tiny_models["bert"]), "float32", "cpu")
    with pytest.raises(DataError, match="holds images"):
        calibration(CalibrationData(source="builtin:digits"), bert.model)
    with pytest.raises(DataError, match="data.calibration.seq_len: 1024 tokens is more than the model's max_position"):
        calibration(CalibrationData(seq_len=1024), bert.model)
    with pytest.raises(DataError, match="perplexity needs a causal LM; BertModel"):
        make_metric(evaluation(EvaluationData(metric="perplexity"), bert.model), bert.model, bert.tokenizer)
    with pytest.raises(DataError, match="accuracy needs an image classifier"):
        make_metric(evaluation(EvaluationData(metric="accuracy"), bert.model), bert.model, bert.tokenizer)


def test_embedding_cosine_is_one_for_the_same_model(tiny_models):
    bert = load_model(str(tiny_models["bert"]), "float32", "cpu")
    metric = make_metric(evaluation(EvaluationData(seq_len=64, max_windows=5), bert.model), bert.model, bert.tokenizer, quiet=True)
    runner = ModelRunner(bert.model, torch.device("cpu"))
    assert metric.name == "embedding_cosine" and metric.dense(runner) == 1.0
    assert metric.measure(runner) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        bert.model.encoder.layer[0].output.dense.weight.mul_(0.0)
    assert metric.measure(runner) < 0.9999


def test_paragraphs_split_and_filter():
    rows = ["short", "one two three four five six seven eight\n\nnine", " = Heading = ", "a b c d e f g h i j"]
    assert paragraphs(rows, None) == ["one two three four five six seven eight", "a b c d e f g h i j"]
    assert paragraphs(rows, 1) == ["one two three four five six seven eight"]


def test_eval_cli_accuracy_and_reference(tiny_models, capsys):
    assert main(["--quiet", "eval", str(tiny_models["vit"]), "--data", "builtin:digits", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "accuracy" and 0.0 <= out["value"] <= 1.0
    bert = str(tiny_models["bert"])
    assert main(["--quiet", "eval", bert, "--seq-len", "64", "--max-windows", "4", "--device", "cpu"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["--quiet", "eval", bert, "--reference", bert, "--seq-len", "64", "--max-windows", "4", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == pytest.approx(1.0, abs=1e-6)


def test_batched_calibration_run(tiny_models, tmp_path, capsys):
    from .conftest import write_recipe

    passes = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
    path = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=tmp_path / "out")
    path.write_text(path.read_text().replace("seq_len = 64\n", "seq_len = 64\nbatch_size = 2\n", 1))
    assert main(["--quiet", "run", str(path)]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["results"]["calibration"]["batch_size"] == 2
    assert all(m["sparsity"] == pytest.approx(0.5, abs=1e-3) for m in record["layers"].values())


def test_image_processor_normalises_and_is_saved(tiny_models, tmp_path):
    import shutil

    from transformers import ViTImageProcessor

    folder = tmp_path / "vit"
    shutil.copytree(tiny_models["vit"], folder)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.2], image_std=[0.4]).save_pretrained(folder)
    loaded = load_model(str(folder), "float32", "cpu")
    assert loaded.tokenizer is not None and list(loaded.tokenizer.image_mean) == [0.2]
    batch = calibration_inputs(calibration(CalibrationData(source="builtin:digits", samples=4, batch_size=4), loaded.model), loaded.model,
                               loaded.tokenizer)[0]
    torch.testing.assert_close(batch, (digits("calibration").pixels[:4] - 0.2) / 0.4)
    path = tmp_path / "r.toml"
    path.write_text(f'version = 1\n[model]\nsource = "{folder}"\ndevice = "cpu"\n[data.calibration]\nsource = "builtin:digits"\n'
                    f'samples = 32\nbatch_size = 16\n[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n'
                    f'[output]\npath = "{tmp_path / "out"}"\n')
    assert main(["--quiet", "run", str(path)]) == 0
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["image_std"] == [0.4]


def test_a_source_is_classified_once_and_calibration_and_metrics_take_the_result(tiny_models, tmp_path, monkeypatch):
    import d2compiler.evaluation.sources as sources

    llama = load_model(str(tiny_models["llama"]), "float32", "cpu")
    path = tmp_path / "windows.safetensors"
    save_file({"input_ids": torch.randint(0, llama.model.config.vocab_size, (6, 16))}, str(path))
    reads = []
    monkeypatch.setattr(sources, "safetensors_keys", lambda source: reads.append(source) or ["input_ids"])
    cal = calibration(CalibrationData(source=str(path), samples=4, seq_len=16, batch_size=2), llama.model)
    ev = evaluation(EvaluationData(source=str(path), seq_len=16), llama.model)
    assert (cal.kind, ev.kind) == ("token-windows", "token-windows") and len(reads) == 2  # one header read each
    assert [w.shape for w in calibration_inputs(cal, llama.model, llama.tokenizer)] == [(2, 16), (2, 16)]
    assert make_metric(ev, llama.model, llama.tokenizer, quiet=True).count == 6
    assert len(reads) == 2  # neither calibration nor the metric classified the source again
    assert sources.source_kind("builtin:digits") == "images" and sources.source_kind("notes.txt") == "text"
