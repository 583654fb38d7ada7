"""Load and validate per-question cascade outputs (the ``cascade_outputs/*.jsonl`` shape).

One JSON object a line::

    {"dataset": "mmlu", "split": "train", "chain": "llama", "idx": 0,
     "system_prompt": "...", "user_prompt": "...", "source_example": {...},
     "models": {"llama3.2-1b": {"answer": "A", "correct": true, "raw_conf_logprob": -1.04,
                                "cost_usd": 1.2e-05, "latency_ms": 244.4, "tokens": {"in": 121, "out": 1}},
                ...}}

Any path works (the shared data folder is only the default of the benchmark script). Every problem is
reported as a one-line :class:`cascade.errors.DataError` that names the file and the line.

A question's id is its ``idx`` within its dataset (``source_dataset`` in a mixed file) and split: ``idx``
numbers the questions of one split (the shared train and test files both start at 0), so an id is unique
within a file (a repeated one is an error) and the same id in two files of one split is the same question.
:func:`check_disjoint` refuses a TEST file that shares questions (same id, or the same prompt) with TRAIN.
Numpy only.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration.features import RAW_SCORE
from cascade.errors import ConfigError, DataError
from cascade.paths import expand_path

REQUIRED_MODEL_FIELDS = ("answer", "correct", "raw_conf_logprob", "cost_usd")
#: a stored log-probability above 0 by at most this is float noise (clipped to 0); above it, an error
LOGPROB_TOLERANCE = 1e-6


@dataclass
class TierOutputs:
    """One model's stored outputs over the questions of a file, as arrays aligned by question."""

    name: str
    answer: list[str]
    correct: np.ndarray  # float64 0/1
    logprob: np.ndarray  # raw confidence log-probability (may be -inf)
    cost: np.ndarray  # USD per question
    latency_ms: np.ndarray
    tokens_in: np.ndarray
    tokens_out: np.ndarray
    #: the engine's confidence features (``calibration.features``) where every line carries them under
    #: ``models.<m>.features`` (live runs do; the shared data does not): feature name -> values
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def answered(self) -> np.ndarray:
        """False where the answer is empty: the engine escalates such an answer whatever its confidence, and so
        does a replay. Where the lines carry the engine's features (live runs), that is an answer with no tokens
        (``features.n_tokens`` 0), as the engine decides: their ``answer`` is what a grader read from the
        response, "" also for a response it could not read, which the engine (it grades nothing) judges by its
        confidence like any other. Otherwise (the shared data) an empty ``answer``."""
        n_tokens = self.features.get("n_tokens")
        if n_tokens is not None:
            return np.asarray(n_tokens) > 0
        return np.array([a != "" for a in self.answer], dtype=bool)

    @property
    def acceptable(self) -> np.ndarray:
        """Where this tier's answer may be accepted: it is not empty and has a confidence (a score of -inf, or a
        null or NaN read as one, is none: such an answer is escalated whatever its calibrated value)."""
        return self.answered & np.isfinite(self.logprob)

    def subset(self, idx: np.ndarray) -> "TierOutputs":
        return TierOutputs(self.name, [self.answer[i] for i in idx], self.correct[idx], self.logprob[idx],
                           self.cost[idx], self.latency_ms[idx], self.tokens_in[idx], self.tokens_out[idx],
                           {k: v[idx] for k, v in self.features.items()})


@dataclass
class CascadeData:
    """The questions of one file, with every model's outputs."""

    path: str
    dataset: str
    chain: str
    split: str
    models: list[str]
    tiers: dict[str, TierOutputs]
    prompt_chars: np.ndarray
    idx: list = field(default_factory=list)
    #: per question: its id (dataset, split, idx) where the line has an ``idx``, else None
    qids: list = field(default_factory=list)
    #: per question: its prompt (system and user) where the line has a user prompt, else None
    prompts: list = field(default_factory=list)
    #: per model: how many lines gave it no confidence (``raw_conf_logprob`` null or NaN), read as -inf
    no_confidence: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_chars)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.chain}/{self.split}"

    def tier(self, name: str) -> TierOutputs:
        try:
            return self.tiers[name]
        except KeyError:
            raise DataError(f"unknown model {name!r} in {self.path}; known: {', '.join(self.models)}") from None

    def check_models(self, names: Sequence[str]) -> list[str]:
        names = [n.strip() for n in names if n and n.strip()]
        if not names:
            raise ConfigError("no model names given")
        for n in names:
            self.tier(n)
        return names

    def with_score(self, feature: str, models: Sequence[str] | None = None) -> "CascadeData":
        """The same questions scored by one of the engine's features instead of the stored raw confidence:
        every model of ``models`` (default: all) gets ``logprob`` = its ``features[feature]``.
        ``raw_conf_logprob`` gives the data as it is."""
        if feature == RAW_SCORE:
            return self
        tiers = dict(self.tiers)
        for m in models or self.models:
            t = self.tier(m)
            if feature not in t.features:
                raise DataError(f"{self.path}: model {m!r} has no numeric 'features.{feature}' on every line "
                                f"(features come from live runs, benchmarks/live_cascade.py; the stored "
                                f"confidence is {RAW_SCORE})")
            tiers[m] = replace(t, logprob=np.minimum(t.features[feature], 0.0))
        scored = set(models or self.models)  # their stored confidence is no longer read
        gaps = {m: k for m, k in self.no_confidence.items() if m not in scored}
        return replace(self, tiers=tiers, no_confidence=gaps)

    def confidence_warnings(self, models: Sequence[str]) -> list[str]:
        """One warning per model of ``models`` that had no confidence on some lines (read as -inf: such an
        answer is never accepted, so the policy escalates it)."""
        return [f"{self.path}: model {m!r} has no confidence (raw_conf_logprob null or NaN) on {self.no_confidence[m]}"
                f" of {len(self)} questions: read as -inf (never accepted, always escalated)"
                for m in models if self.no_confidence.get(m)]

    def subset(self, idx: Sequence[int] | np.ndarray, split: str | None = None) -> "CascadeData":
        idx = np.asarray(idx, dtype=int)
        return CascadeData(self.path, self.dataset, self.chain, split or self.split, list(self.models),
                           {m: t.subset(idx) for m, t in self.tiers.items()}, self.prompt_chars[idx],
                           [self.idx[i] for i in idx] if self.idx else [],
                           [self.qids[i] for i in idx] if self.qids else [],
                           [self.prompts[i] for i in idx] if self.prompts else [])


def _bad(path: Path, lineno: int, what: str) -> DataError:
    return DataError(f"{path}:{lineno}: {what}")


def _float(v, path: Path, lineno: int, model: str, key: str, allow_neg_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str) and allow_neg_inf and v.strip().lower() in ("-inf", "-infinity"):
            return -math.inf
        raise _bad(path, lineno, f"model {model!r}: {key} must be a number, got {v!r}")
    x = float(v)
    if math.isnan(x) or (math.isinf(x) and not (allow_neg_inf and x < 0)):
        raise _bad(path, lineno, f"model {model!r}: {key} is not finite ({v!r})")
    return x


def _token_count(v, path: Path, lineno: int, model: str, key: str) -> float:
    """A ``tokens.in``/``tokens.out`` count that a line has: 0 for null, else a finite number >= 0."""
    if v is None:
        return 0.0
    x = _float(v, path, lineno, model, f"tokens.{key}")
    if x < 0:
        raise _bad(path, lineno, f"model {model!r}: tokens.{key} is negative ({v!r})")
    return x


def _correct(v, path: Path, lineno: int, model: str, answer: Any = "x") -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return float(v)
    if v is None and (answer is None or not str(answer).strip()):  # no answer, not graded: not correct
        return 0.0
    raise _bad(path, lineno, f"model {model!r}: correct must be true/false, got {v!r}")


def _collect_features(acc: dict[str, list[float]] | None, features: Any, i: int, path: Path, lineno: int,
                      model: str) -> dict[str, list[float]] | None:
    """``acc`` with line ``i``'s numeric features appended. Only features that every line carries are kept:
    one missing from a line is dropped, and a line with no ``features`` object at all ends the collection
    (None). A log-probability feature (``*_logprob``, what ``--feature`` scores with) that is NaN, +inf or
    above 0 is refused, naming the line: one such value would bend a whole fit."""
    if acc is None or not isinstance(features, dict):
        return None
    for k, v in features.items():
        if str(k).endswith("_logprob") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                and (math.isnan(v) or v > LOGPROB_TOLERANCE):
            raise _bad(path, lineno, f"model {model!r}: features.{k} must be a log-probability (<= 0, or -inf), "
                                     f"got {v!r}")
    if i == 0:
        return {k: [float(v)] for k, v in features.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in list(acc):
        v = features.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k].append(float(v))
        else:
            del acc[k]
    return acc


def _json_int(text: str) -> int | float:
    """A JSON integer as ``json`` reads it, except one beyond any float (``1e400`` written out), which every
    number of a line is converted to: read as infinity (refused as not finite, naming its line), rather than an
    OverflowError where it is converted, or a ValueError past the digits Python converts (4300)."""
    try:
        value = int(text)
    except ValueError:
        return float(text)
    return value if abs(value) <= sys.float_info.max else float(text)


def load_cascade_outputs(path: str | Path) -> CascadeData:
    """Read and validate one JSONL file of per-question cascade outputs."""
    p = expand_path(path, "data file")
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":  # said as what it is, not as bytes that are not UTF-8
        raise DataError(f"{p}: gzip-compressed: decompress it first (gunzip); a data file is JSON Lines text")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (as some editors write) is not part of the first line
    except UnicodeDecodeError as exc:
        raise _bad(p, raw.count(b"\n", 0, exc.start) + 1, f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
    models: list[str] | None = None
    cols: dict[str, dict[str, list]] = {}
    prompt_chars: list[float] = []
    idxs: list = []
    qids: list = []
    prompts: list = []
    seen: dict[tuple[str, str, str], int] = {}  # question id -> line it was first on
    meta = {"dataset": "", "chain": "", "split": ""}
    no_confidence: dict[str, int] = {}
    total_cost = 0.0  # every cost of the file, summed as a float (Python's: inf past the range, no warning)
    n = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            array = " (a JSON array? a data file is JSON Lines: one object per line)" \
                if lineno == 1 and line.lstrip().startswith("[") else ""
            raise _bad(p, lineno, f"not valid JSON ({exc.msg}){array}") from None
        except RecursionError:  # the decoder recurses once per nesting level
            raise _bad(p, lineno, "not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            array = " (a JSON array: write one object per line, JSON Lines)" if isinstance(row, list) else ""
            raise _bad(p, lineno, f"each line must be a JSON object{array}")
        ms = row.get("models")
        if not isinstance(ms, dict) or not ms:
            raise _bad(p, lineno, "missing or empty 'models' object")
        if models is None:
            models = list(ms)
            cols = {m: {k: [] for k in ("answer", "correct", "lp", "cost", "lat", "tin", "tout")} for m in models}
            feats: dict[str, dict[str, list[float]] | None] = {m: {} for m in models}
            for k in meta:
                meta[k] = str(row.get(k, "") or "")
        elif set(ms) != set(models):
            extra = sorted(set(ms) - set(models))
            missing = sorted(set(models) - set(ms))
            raise _bad(p, lineno, f"models differ from the first line (extra {extra}, missing {missing})")
        for m in models:
            rec = ms[m]
            if not isinstance(rec, dict):
                raise _bad(p, lineno, f"model {m!r}: entry must be an object")
            for k in REQUIRED_MODEL_FIELDS:
                if k not in rec:
                    raise _bad(p, lineno, f"model {m!r}: missing field {k!r}")
            c = cols[m]
            ans = rec["answer"]
            c["answer"].append("" if ans is None else str(ans))
            c["correct"].append(_correct(rec["correct"], p, lineno, m, ans))
            lp = rec["raw_conf_logprob"]
            if lp is None or (isinstance(lp, float) and math.isnan(lp)):  # no confidence given: never accepted
                no_confidence[m] = no_confidence.get(m, 0) + 1
                lp = -math.inf
            lp = _float(lp, p, lineno, m, "raw_conf_logprob", True)
            if lp > LOGPROB_TOLERANCE:  # a probability above 1: not a log-probability (it would distort fits)
                raise _bad(p, lineno, f"model {m!r}: raw_conf_logprob must be a log-probability (<= 0), got {lp!r}")
            c["lp"].append(min(lp, 0.0))  # float noise just above 0 is a probability of 1
            cost = _float(rec["cost_usd"], p, lineno, m, "cost_usd")
            if cost < 0:
                raise _bad(p, lineno, f"model {m!r}: cost_usd is negative ({cost})")
            total_cost += cost
            if math.isinf(total_cost):  # each finite, but a replay's sums of them would overflow to inf and NaN
                raise _bad(p, lineno, f"model {m!r}: cost_usd {cost!r} takes the file's costs past what a float "
                                      "holds (a cost is USD per question)")
            c["cost"].append(cost)
            lat = rec.get("latency_ms")
            c["lat"].append(float(lat) if isinstance(lat, (int, float)) and not isinstance(lat, bool) else math.nan)
            tok = rec.get("tokens") if isinstance(rec.get("tokens"), dict) else {}
            for key, col in (("in", "tin"), ("out", "tout")):  # optional: unknown (NaN) when missing
                c[col].append(_token_count(tok[key], p, lineno, m, key) if key in tok else math.nan)
            feats[m] = _collect_features(feats[m], rec.get("features"), n, p, lineno, m)
        prompt = f"{row.get('system_prompt', '') or ''}\n{row.get('user_prompt', '') or ''}"
        prompt_chars.append(float(len(prompt)))
        prompts.append(prompt if str(row.get("user_prompt") or "").strip() else None)  # no question: no prompt
        idxs.append(row.get("idx", n))
        qid = _question_id(row)
        if qid is not None:
            first = seen.setdefault(qid, lineno)
            if first != lineno:
                raise _bad(p, lineno, f"duplicate question id (idx {row['idx']!r}, first on line {first}): "
                                      "each question may appear once in a file")
        qids.append(qid)
        n += 1
    if n == 0 or models is None:
        raise DataError(f"{p}: no questions (empty file)")
    tiers = {
        m: TierOutputs(m, c["answer"], np.asarray(c["correct"]), np.asarray(c["lp"]), np.asarray(c["cost"]),
                       np.asarray(c["lat"]), np.asarray(c["tin"]), np.asarray(c["tout"]),
                       {k: np.asarray(v) for k, v in (feats[m] or {}).items()})
        for m, c in cols.items()
    }
    if not meta["dataset"] or not meta["chain"] or not meta["split"]:
        # fall back to the file name: {dataset}_{chain}_{split}.jsonl
        parts = p.stem.split("_")
        if len(parts) >= 3:
            meta["dataset"] = meta["dataset"] or parts[0]
            meta["split"] = meta["split"] or parts[-1]
            meta["chain"] = meta["chain"] or "_".join(parts[1:-1])
        else:
            meta["dataset"] = meta["dataset"] or p.stem
    # an id's dataset and split default to the file's (its first line, or its name)
    qids = [None if q is None else (q[0] or meta["dataset"], q[1] or meta["split"], q[2]) for q in qids]
    return CascadeData(str(p), meta["dataset"], meta["chain"], meta["split"], models, tiers,
                       np.asarray(prompt_chars), idxs, qids, prompts, no_confidence)


def _question_id(row: dict) -> tuple[str, str, str] | None:
    """(dataset, split, idx) of a line with an ``idx`` (not null); a mixed file's lines name their
    ``source_dataset``. An ``idx`` of 3, of 3.0 and of "3" are the same id."""
    v = row.get("idx")
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():  # a writer that stored it as a float (pandas, JavaScript)
        v = int(v)
    ident = str(v) if isinstance(v, (int, str)) and not isinstance(v, bool) else json.dumps(v, sort_keys=True)
    dataset = row.get("source_dataset") or row.get("dataset") or ""
    return (str(dataset), str(row.get("split") or ""), ident)


#: what to do about a test file that holds most of the training file, said to a user of ``cascade replay``
SPLIT_HINT = "give one file as both --train and --test to split it into disjoint parts"


def check_disjoint(train: CascadeData, test: CascadeData, hint: str = SPLIT_HINT) -> str | None:
    """Questions of ``test`` that also appear in ``train``, by id or by prompt: a replay fits on TRAIN and
    measures on TEST, and nothing may be fit on TEST. Most of TEST in TRAIN (a copy of the file, the same split
    twice) is a DataError ending with ``hint`` (what the caller's user can do); a few (benchmarks repeat some
    questions across their splits) are a warning, returned (None: no overlap)."""
    # an id without a split (no ``split`` on the lines, none in the file name) only numbers the lines of its
    # file: two such files both count from 0, so it names the same question only where no prompt says otherwise
    ids = {q: t for q, t in zip(train.qids, train.prompts or [None] * len(train)) if q is not None}
    same_id = [q is not None and q in ids and (bool(q[1]) or t is None or ids[q] is None or ids[q] == t)
               for q, t in zip(test.qids, test.prompts or [None] * len(test))] or [False] * len(test)
    texts = {t for t in train.prompts if t is not None}
    same_text = [t is not None and t in texts for t in test.prompts] or [False] * len(test)
    n = sum(a or b for a, b in zip(same_id, same_text))
    if not n:
        return None
    how = " and ".join(w for w, k in (("id", any(same_id)), ("prompt", any(same_text))) if k)
    what = (f"{n} of the {len(test)} questions of the test file {test.path} are also in the training file "
            f"{train.path} (same question {how})")
    if 2 * n > len(test):
        raise DataError(f"{what}: nothing may be fit on TEST; {hint}")
    return f"{what}: they count in the test figures although they were fit on"


def check_both_outcomes(correct: Any, model: str, where: str) -> None:
    """A calibrator needs right and wrong answers: DataError when ``correct`` holds only one outcome (or only one
    question, where that is the first thing to say)."""
    if len(correct) < 2:
        raise DataError(f"{where}: {len(correct)} question(s); calibration needs at least 2 (right and wrong answers)")
    if correct.min() == correct.max():
        raise DataError(f"only one outcome ({'all correct' if correct[0] else 'all wrong'}) for {model} in "
                        f"{where}: cannot calibrate (a calibrator needs right and wrong answers)")


def split_data(data: CascadeData, test_fraction: float = 0.5, seed: int = 0) -> tuple[CascadeData, CascadeData]:
    """A fixed-seed random split of one file into (train, test) parts, for files with no test split."""
    if not (0.0 < test_fraction < 1.0):
        raise ConfigError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    n = len(data)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"{data.path}: {n} questions cannot be split into non-empty train and test parts")
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return data.subset(train_idx, split="train-part"), data.subset(test_idx, split="test-part")


# --- answers: normalisation and agreement between tiers ---------------------------------------------

_FINAL_NUM = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUM = re.compile(r"-?\d[\d,]*\.?\d*")
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(ans: str) -> str:
    """A comparable form of an answer: the letter of a multiple-choice answer, the final number of a
    worked solution (``#### x``), else lower-cased words without punctuation and articles."""
    s = (ans or "").strip()
    if len(s) <= 3 and s[:1].upper() in "ABCDE" and (len(s) == 1 or not s[1:2].isalpha()):
        return s[:1].upper()
    m = _FINAL_NUM.search(s)
    if m:
        num = m.group(1).replace(",", "")
        try:
            return repr(float(num))
        except ValueError:
            return num
    s = _ARTICLES.sub(" ", _PUNCT.sub(" ", s.lower()))
    return " ".join(s.split())


def answer_agreement(a: str, b: str) -> float:
    """1.0 when two normalised answers match; for free text, the token-overlap F1 (0..1)."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return 1.0
    ta, tb = na.split(), nb.split()
    if len(ta) <= 1 and len(tb) <= 1:
        return 0.0
    common = 0
    tb_left = list(tb)
    for t in ta:
        if t in tb_left:
            tb_left.remove(t)
            common += 1
    if common == 0:
        return 0.0
    prec, rec = common / len(ta), common / len(tb)
    return 2 * prec * rec / (prec + rec)


def answer_format_ok(ans: str) -> float:
    """1.0 when the answer has the expected shape: one letter, a ``#### x`` final line, or short text."""
    s = (ans or "").strip()
    if not s:
        return 0.0
    if len(s) == 1:
        return 1.0
    if "####" in s:
        return 1.0 if _FINAL_NUM.search(s) else 0.0
    return 1.0 if len(s.split()) <= 40 else 0.0
