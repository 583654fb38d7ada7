"""Recalibration from the ledger, versioned calibrator artifacts, and reloading them into a running server.

Labels for a tier's answers come from the ledger:

* **feedback**: thumbs up (score 1) / down (-1) on a request whose served answer was this tier's;
* **agreement**: where a stronger tier (a later tier of the same request) also answered, whether the two
  answers' signatures (``attempts.answer_sig``: a digest of the normalised text) are equal.

Feedback wins where both exist. :func:`recalibrate` fits a new calibrator on part of the labelled answers,
compares its ECE with the tier's current calibrator on the held-out rest, and writes a versioned artifact
(``calibration.save_calibrator``) that says what it was fitted on.

:func:`reload_engine` swaps each tier's calibrator (and thresholds) of a running engine from the config
file and the artifacts it names; the server calls it on ``POST /admin/reload`` and on SIGHUP. Each swap is
one attribute assignment on the event loop thread, so requests in flight finish with whichever calibrator
they read and none is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from calibration.calibrators import METHODS, Calibrator, make_calibrator, save_calibrator
from cascade.config import Config, environ_without_flags, load_config, tokens_per_minute_problem, topk_problem
from cascade.errors import CascadeError, ConfigError, DataError, PermissionDeniedError
from cascade.ledger import Ledger, _redact
from cascade.paths import expand_path

log = logging.getLogger("cascade.recalibrate")

LABEL_SOURCES = ("feedback", "agreement")
RECALIBRATE_METHODS = (*METHODS, "auto")


# --- labelled data ---------------------------------------------------------------------------------


def _features(text: Any) -> dict[str, float] | None:
    """An attempt's ``features`` as the ledger holds them (JSON text): its finite numbers by name, or None where the
    text is not a JSON object. The engine writes finite floats only; a row written otherwise (by hand, another
    program) is read as an answer without features, and a value that is no finite number as a feature not
    recorded, rather than a traceback or a fit on NaN."""
    try:
        features = json.loads(text)
    except (TypeError, ValueError, RecursionError):  # (a number of more digits than Python converts: ValueError)
        return None
    if not isinstance(features, dict):
        return None
    out = {}
    for k, v in features.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                v = float(v)
            except OverflowError:  # an integer beyond a float's range
                continue
            if math.isfinite(v):
                out[k] = v
    return out


def _judged(features: dict[str, Any]) -> bool:
    """Whether a calibrator judges an answer with these features: one without tokens (a provider's answer that
    came without logprobs) is escalated whatever any calibrator says (cascade.policy.decide), its scores the
    floor's (-30): labelled and fitted on, it would teach the calibrator what such a score means on answers it
    never sees."""
    return features.get("n_tokens", 1.0) > 0


def labelled_answers(ledger: Ledger, tier: str, since: float | None = None,
                     sources: Sequence[str] = LABEL_SOURCES, stronger: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every answer of ``tier`` in the ledger that carries a label and that a calibrator judges (it has tokens),
    oldest first.

    Each row: request_id, created_at, policy, model (the attempt's), kept, features (dict), confidence (as
    recorded), label (0/1), source. Feedback labels the answer served, and any earlier tier's answer identical
    to it (a different one is wrong if the served one was right, unknown if it was wrong); agreement compares
    an answer with a stronger tier's, from the live path or bought by a sampled shadow (of a tier in
    ``stronger``: those after ``tier`` in a policy's chain; a shadow's chain may hold weaker ones).
    """
    bad = [s for s in sources if s not in LABEL_SOURCES]
    if bad or not sources:
        raise ConfigError(f"--labels: choose from {', '.join(LABEL_SOURCES)} (comma-separated), got {list(sources)}")
    rows = ledger.execute_dicts(
        "SELECT a.request_id AS request_id, r.created_at AS created_at, r.policy AS policy, a.kept AS kept, "
        "a.model AS model, "
        "a.features AS features, a.confidence AS confidence, a.answer_sig AS sig, "
        # the latest feedback on a request is its label: a user who changes their mind replaces it
        "(SELECT f.score FROM feedback f WHERE f.request_id = a.request_id ORDER BY f.id DESC LIMIT 1) AS feedback, "
        "(SELECT MAX(f.id) FROM feedback f WHERE f.request_id = a.request_id) AS feedback_id, "
        "(SELECT k.answer_sig FROM attempts k WHERE k.request_id = a.request_id AND k.kept = 1 LIMIT 1) AS kept_sig, "
        # a stronger tier's answer: a later tier of the live path, else one a sampled shadow bought of a stronger
        # tier (shadows sample the tiers the live path skipped: the only agreement an answer it kept can have)
        "COALESCE((SELECT b.answer_sig FROM attempts b WHERE b.request_id = a.request_id AND b.idx > a.idx "
        " AND b.tier <> a.tier AND b.error_class IS NULL AND b.answer_sig IS NOT NULL ORDER BY b.idx DESC LIMIT 1), "
        + ("(SELECT sa.answer_sig FROM shadow_attempts sa WHERE sa.request_id = a.request_id AND sa.tier IN ("
           + ", ".join("?" * len(stronger)) + ") AND sa.error_class IS NULL AND sa.answer_sig IS NOT NULL "
           "ORDER BY sa.idx DESC LIMIT 1)" if stronger else "NULL") + ") AS stronger_sig "
        "FROM attempts a JOIN requests r ON r.request_id = a.request_id "
        "WHERE a.tier = ? AND a.error_class IS NULL AND a.features IS NOT NULL"
        + (" AND r.created_at >= ?" if since is not None else "")
        + " ORDER BY r.created_at, a.request_id, a.idx",
        (*stronger, tier, since) if since is not None else (*stronger, tier))
    # feedback given on a response-cache hit labels the answer it served, its original's (whichever tier served
    # it: an earlier tier's answer is labelled through it as through the original's own feedback). Each
    # request's latest feedback is its label (0: none); of the original's and its hits', the latest label wins
    hit_latest: dict[str, tuple[str, int, int]] = {}  # hit request -> (its original, feedback id, score)
    for h in ledger.execute_dicts(
            "SELECT r.cached_from AS original, f.request_id AS hit, f.id AS id, f.score AS score FROM feedback f "
            "JOIN requests r ON r.request_id = f.request_id JOIN requests o ON o.request_id = r.cached_from "
            "WHERE r.cached_from IS NOT NULL" + (" AND o.created_at >= ?" if since is not None else "")
            + " ORDER BY f.id", (since,) if since is not None else ()):
        hit_latest[h["hit"]] = (h["original"], int(h["id"]), int(h["score"]))
    on_hits: dict[str, tuple[int, int]] = {}
    for original, fid, score in hit_latest.values():
        if score != 0 and fid > on_hits.get(original, (-1, 0))[0]:
            on_hits[original] = (fid, score)
    out = []
    seen: set[str] = set()
    for r in rows:
        if r["request_id"] in seen:  # a tier answers once per request; provider fallbacks fail first
            continue
        features = _features(r["features"])
        if features is None or not _judged(features):
            continue
        label, source = None, None
        fb = r["feedback"]
        hit_fb = on_hits.get(r["request_id"])
        if hit_fb is not None and (not fb or hit_fb[0] > int(r["feedback_id"])):  # (the own label: not 0)
            fb = hit_fb[1]
        judged = "feedback" in sources and fb is not None and int(fb) != 0
        if judged and r["kept"]:
            label, source = int(int(fb) > 0), "feedback"
        elif judged and r["sig"] is not None and r["kept_sig"] is not None:
            # the user judged the answer served, a later tier's: the same answer takes the same label; another
            # one is wrong when the served one was right, and unknown when it was wrong (no agreement with it)
            if r["sig"] == r["kept_sig"]:
                label, source = int(int(fb) > 0), "feedback"
            elif int(fb) > 0:
                label, source = 0, "feedback"
            else:
                continue
        elif "agreement" in sources and r["stronger_sig"] is not None and r["sig"] is not None:
            label, source = int(r["sig"] == r["stronger_sig"]), "agreement"
        if label is None:
            continue
        seen.add(r["request_id"])
        out.append({"request_id": r["request_id"], "created_at": float(r["created_at"]), "policy": r["policy"],
                    "model": r["model"], "kept": bool(r["kept"]), "features": features,
                    "confidence": r["confidence"],
                    "label": label, "source": source})
    return out


# --- versioned artifacts ---------------------------------------------------------------------------


def _file_stem(tier: str) -> str:
    """A tier's name as the stem of its artifact files (``<stem>.json``, ``<stem>.v<N>.json``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", tier)


def _version_name(tier: str) -> "re.Pattern[str]":
    """The file name of one of a tier's versions, ``<stem>.v<N>.json`` (group 1: N)."""
    return re.compile(rf"^{re.escape(_file_stem(tier))}\.v(\d+)\.json$")


def _fitted_version(fitted_on: Any) -> int:
    """An artifact's ``fitted_on.version``; 0 where it has none or one that is no number (a hand-edited artifact,
    which the engine serves all the same: its next version is numbered as after none)."""
    try:
        return max(0, int(fitted_on.get("version") or 0))
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0


def _version_of(path: Path) -> int:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # (JSON nested deeper than the decoder recurses)
        return 0
    return _fitted_version(data.get("fitted_on") if isinstance(data, dict) else None)


def _names_a_file(out: str | Path) -> bool:
    """``--out`` names the artifact file itself (``.json``, in any case: ``X.JSON`` is no directory's name)."""
    return str(out).lower().endswith(".json")


def artifact_path(out: str | Path | None, tier: str, *, default_dir: Path, previous_version: int = 0) -> tuple[Path, int]:
    """Where the new artifact goes and its version number.

    ``out`` ending in ``.json`` is the exact file (version: one more than the file's or the tier's
    current calibrator's); otherwise it is a directory (default ``default_dir``) receiving
    ``<tier>.v<N>.json`` with N one more than the highest version already there.
    """
    safe = _file_stem(tier)
    if out is not None and _names_a_file(out):
        p = expand_path(out, "--out")
        return p, max(previous_version, _version_of(p) if p.exists() else 0) + 1
    d = expand_path(out, "--out") if out is not None else default_dir
    pat = _version_name(tier)
    have = [int(m.group(1)) for f in (d.iterdir() if d.is_dir() else ()) if (m := pat.match(f.name))]
    v = max([previous_version, *have]) + 1
    return d / f"{safe}.v{v}.json", v


def _check_out(out: str | Path | None) -> None:
    """``--out``, checked before the work: a writable ``.json`` file, or a directory (existing or not)."""
    if out is None:
        return
    from cascade.cli import check_output_file

    if _names_a_file(out):
        check_output_file(out, "--out")
        return
    if not str(out).strip():
        raise ConfigError("--out: empty path")
    d = expand_path(out, "--out")
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {out}: not a directory (give a directory, or a file name ending in .json)")


def _configured_artifacts(config: Config) -> Iterator[tuple[str, Path]]:
    """Every calibrator artifact ``config`` reads, as (its key, its path): tiers', policies' and shadows'."""
    pairs = [(f"tiers.{t.name}.calibrator", t.calibrator) for t in config.tiers]
    for kind, section in (("policies", config.policies), ("shadows", config.shadows)):
        pairs += [(f"{kind}.{name}.calibrators.{t}", cc) for name, item in section.items()
                  for t, cc in item.calibrators.items()]
    for key, cc in pairs:
        if cc.artifact:
            yield key, expand_path(cc.artifact, key + ".artifact")


def _check_not_in_use(path: Path, tier: str, configured: Path | None, config: Config) -> None:
    """Versions are never rewritten in place: refuse an ``--out`` file that is the artifact the tier serves now
    (directly or through its link), one that another key of the config reads (a policy's or a shadow's own
    calibrator: a reload or restart would swap it unasked), or an existing ``<tier>.v<N>.json``, which a link
    or a config may name."""
    if not path.exists():
        return
    safe = _file_stem(tier)
    if configured is not None and configured.exists() and path.resolve() == configured.resolve():
        raise ConfigError(f"--out {path}: that is the calibrator tier {tier!r} serves now (its config reads "
                          f"{configured}); a version is never rewritten in place: give a directory (a new "
                          f"{safe}.v<N>.json is written there) or a new file")
    for key, other in _configured_artifacts(config):
        if other.exists() and path.resolve() == other.resolve():
            raise ConfigError(f"--out {path}: that is the calibrator {key} reads (the config names {other}); "
                              f"a calibrator in use is never rewritten in place: give a directory (a new "
                              f"{safe}.v<N>.json is written there) or a new file")
    if _version_name(tier).match(path.name):
        raise ConfigError(f"--out {path}: that version exists already; versions are never rewritten in place: "
                          "give a directory (the next version is written there) or a new file")


def _link_path(artifact: Path, tier: str) -> Path:
    return artifact.parent / f"{_file_stem(tier)}.json"


def backup_name(path: Path) -> Path:
    """A name beside ``path`` that is free: ``<name>.bak``, else ``<name>.bak.<N>``."""
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.bak.{n}")
    return candidate


def activate(artifact: Path, tier: str) -> Path:
    """Point ``<dir>/<tier>.json`` (what a config names) at ``artifact``, atomically (a relative symlink).

    A regular file there (a hand-written or first artifact, not a link made here) is kept: copied to
    :func:`backup_name` first (see :func:`activate_keeping`, which says where)."""
    return activate_keeping(artifact, tier)[0]


def activate_keeping(artifact: Path, tier: str) -> tuple[Path, Path | None]:
    """:func:`activate`, returning the link and where a regular file it replaced was kept (or None)."""
    safe = _file_stem(tier)
    link = _link_path(artifact, tier)
    kept = None
    if link.is_file() and not link.is_symlink():
        import shutil

        kept = backup_name(link)
        shutil.copy2(link, kept)  # a copy first: the link swap below stays one atomic rename
    tmp = artifact.parent / f".{safe}.json.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(artifact.name)
    tmp.replace(link)
    return link, kept


# --- fitting ---------------------------------------------------------------------------------------


def _split(n: int, holdout: float, seed: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split, stratified by label so both parts hold both classes where possible."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        k = int(round(len(idx) * holdout))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.array(sorted(train), dtype=int), np.array(sorted(test), dtype=int)


#: the share of a tier's answers whose score may lie outside the labelled range before a refit is called an
#: extrapolation (warned of; ``--activate`` refused unless allowed)
MAX_OUTSIDE_SHARE = 0.10


def score_coverage(ledger: Ledger, tier: str, feature: str, since: float | None, labelled: np.ndarray,
                   models: Sequence[str] | None = None) -> dict[str, Any]:
    """How much of ``tier``'s traffic the labels cover: the range of the labelled answers' scores, and the
    share of all its answers in the window (labelled or not) outside it. Agreement labels exist only where the tier
    escalated, i.e. below its threshold: a fit on them alone says nothing of the answers it keeps. ``models``: only
    the answers of these models (those the tier runs now) count."""
    of_models = f" AND a.model IN ({', '.join('?' * len(models))})" if models else ""
    rows = ledger.execute(
        "SELECT a.features, a.kept FROM attempts a JOIN requests r ON r.request_id = a.request_id "
        "WHERE a.tier = ? AND a.error_class IS NULL AND a.features IS NOT NULL" + of_models
        + (" AND r.created_at >= ?" if since is not None else ""),
        (tier, *(models or ()), *((since,) if since is not None else ())))
    scores, kept = [], 0
    for feats, k in rows:
        f = _features(feats)
        v = None if f is None else f.get(feature)
        if isinstance(v, (int, float)) and _judged(f):
            scores.append(float(v))
            kept += int(bool(k))
    lo, hi = float(labelled.min()), float(labelled.max())
    allx = np.asarray(scores)
    outside = int(((allx < lo) | (allx > hi)).sum()) if len(allx) else 0
    return {"feature": feature, "labelled_range": [lo, hi], "answers": len(scores), "kept_answers": kept,
            "outside": outside, "outside_share": outside / len(scores) if scores else 0.0}


def recalibrate(config: Config, ledger: Ledger, *, tier: str | None = None, since: float | None = None,
                min_samples: int = 50, method: str | None = None, feature: str | None = None,
                sources: Sequence[str] = LABEL_SOURCES, holdout: float = 0.3, seed: int = 0,
                out: str | Path | None = None, default_dir: Path | None = None,
                do_activate: bool = False, allow_extrapolation: bool = False) -> dict[str, Any]:
    """Refit ``tier``'s calibrator from labelled ledger rows; write a versioned artifact; return a report."""
    from calibration import metrics
    from cascade.engine import build_calibrator, build_policy_calibrators

    names = [t.name for t in config.tiers]
    tier = tier or config.policies[config.default_policy_name].chain[0]
    if tier not in names:
        raise ConfigError(f"--tier: unknown tier {tier!r}; tiers are {names}")
    if min_samples < 4:
        raise ConfigError("--min-samples must be at least 4 (a fit and a held-out slice need a few each)")
    if not 0.05 <= holdout <= 0.9:
        raise ConfigError(f"--holdout must be within [0.05, 0.9], got {holdout}")
    _check_out(out)
    tc = config.tier(tier)
    old = build_calibrator(tc.calibrator, tier=tier)
    method = method or (old.method if old.method in METHODS else "temperature")
    if method not in RECALIBRATE_METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; known: {', '.join(RECALIBRATE_METHODS)}")
    feature = feature or (old.feature if old.method in METHODS else "mean_logprob")
    from calibration.features import FEATURE_NAMES

    if feature not in FEATURE_NAMES:
        raise ConfigError(f"--feature: unknown feature {feature!r}; known: {', '.join(FEATURE_NAMES)}")
    # the new version must be one the engine serves as fitted: a feature the tier cannot compute is refused when
    # the engine builds it (the link --activate made would stop the next restart), and a `feature:` the config
    # sets beside the artifact would serve the fitted map on that feature instead
    if why := topk_problem("--feature", [feature], tier, tc.top_logprobs):
        raise ConfigError(why)
    if tc.calibrator.artifact and "feature" in tc.calibrator.model_fields_set and tc.calibrator.feature != feature:
        raise ConfigError(f"--feature {feature}: tiers.{tier}.calibrator sets feature: {tc.calibrator.feature} beside "
                          f"its artifact, so the engine would serve a fit on {feature} on {tc.calibrator.feature}; "
                          f"leave out --feature, or remove feature: from the config (the artifact names its own)")

    # the tiers after this one in any policy's chain: the stronger answers a sampled shadow may have bought
    stronger = sorted({t for pol in config.policies.values() if tier in pol.chain
                       for t in pol.chain[pol.chain.index(tier) + 1:]})
    labelled = labelled_answers(ledger, tier, since, sources, stronger)
    # the calibrator will judge the answers of the models the tier runs now (its own; with providers, each one's):
    # answers of another (the tier's model before a change, kept in the ledger) would fit it to that model
    models = sorted({tc.model, *(p.model for p in tc.providers or ())})
    current = [r for r in labelled if r["model"] in models]
    other_model = len(labelled) - len(current)
    others_text = (f"{other_model} labelled answers of tier {tier!r} are another model's than "
                   f"{', '.join(map(repr, models))} (the tier's model before a change): left out")
    rows = [r for r in current if feature in r["features"]]
    by_source = {s: sum(1 for r in rows if r["source"] == s) for s in LABEL_SOURCES}
    y = np.array([r["label"] for r in rows], dtype=float)
    where = f" since {datetime.fromtimestamp(since, UTC).isoformat(timespec='seconds')}" if since else ""
    if len(rows) < min_samples:
        # answers labelled but without the feature (a backend that records fewer, e.g. no top_logprobs): said apart,
        # not counted as missing labels (a lower --min-samples would not help; another --feature may)
        lacking = len(current) - len(rows)
        recording = f" that record the feature {feature!r}" if lacking else ""
        others = f"; {lacking} more do not (another --feature may do)" if lacking else ""
        if other_model:
            others += f"; {other_model} more are another model's than {', '.join(map(repr, models))} (left out)"
        raise DataError(f"only {len(rows)} labelled answers of tier {tier!r}{recording} in the ledger{where} "
                        f"({by_source['feedback']} from feedback, {by_source['agreement']} from agreement with a "
                        f"stronger tier){others}; --min-samples is {min_samples}")
    if y.min() == y.max():
        raise DataError(f"all {len(rows)} labelled answers of tier {tier!r}{where} are "
                        f"{'right' if y[0] else 'wrong'}: a calibrator needs both outcomes")
    train, test = _split(len(rows), holdout, seed, y.astype(int))
    if len(test) == 0 or len(train) == 0 or y[train].min() == y[train].max():
        raise DataError(f"{len(rows)} labelled answers are too few to split into a fit and a held-out slice "
                        "that both hold right and wrong answers")
    scores = np.array([float(r["features"][feature]) for r in rows])
    coverage = score_coverage(ledger, tier, feature, since, scores, models)
    coverage["kept_labelled"] = sum(1 for r in rows if r["kept"])
    extrapolated = coverage["outside_share"] > MAX_OUTSIDE_SHARE
    if extrapolated and do_activate and not allow_extrapolation:
        raise DataError(_extrapolation_text(tier, coverage) + ": --activate refused (label the answers the tier "
                        "keeps: feedback, or a sampled shadow that escalates them; or pass --allow-extrapolation)")
    try:
        if method == "auto":
            from calibration.selection import select_calibrator

            sel = select_calibrator(scores[train], y[train], feature=feature, k=min(5, len(train)), seed=seed)
            new: Calibrator = sel.calibrator
        else:
            new = make_calibrator(method, feature).fit(scores[train], y[train])
    except ValueError as exc:
        raise DataError(f"cannot fit a {method} calibrator for tier {tier!r}: {exc}") from exc

    # "old" is the calibrator that served each answer: a policy's own one for this tier where it has one
    policy_cals = build_policy_calibrators(config)
    overridden_by = sorted(p for p, cals in policy_cals.items() if tier in cals)

    def old_p(idx: np.ndarray) -> np.ndarray:
        return np.array([policy_cals.get(rows[i]["policy"], {}).get(tier, old).predict_one(rows[i]["features"])
                         for i in idx])

    held = {"old": metrics.summary(old_p(test), y[test]), "new": metrics.summary(new.predict(scores[test]), y[test])}
    fit = {"old": metrics.summary(old_p(train), y[train]), "new": metrics.summary(new.predict(scores[train]), y[train])}
    previous = _fitted_version(getattr(old, "fitted_on", {}))
    configured = expand_path(tc.calibrator.artifact, f"tiers.{tier}.calibrator.artifact") \
        if tc.calibrator.artifact else None
    # the new version goes beside the artifact the config reads, where --activate's link is the one it uses
    default_dir = configured.parent if configured is not None else (default_dir or Path("calibrators"))
    path, version = artifact_path(out, tier, default_dir=default_dir, previous_version=previous)
    _check_not_in_use(path, tier, configured, config)
    if do_activate and path.name == _file_stem(tier) + ".json":
        raise ConfigError(f"--activate points {path.name} at the new version: write the version elsewhere "
                          "(--out a directory) rather than to that file itself")
    new.fitted_on = {
        "source": "ledger", "ledger": _redact(ledger.target), "tier": tier, "model": tc.model,
        "version": version, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "since": None if since is None else datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds"),
        "first_request_at": datetime.fromtimestamp(rows[0]["created_at"], UTC).isoformat(timespec="seconds"),
        "last_request_at": datetime.fromtimestamp(rows[-1]["created_at"], UTC).isoformat(timespec="seconds"),
        "n": len(rows), "n_fit": int(len(train)), "n_heldout": int(len(test)), "holdout": holdout, "seed": seed,
        "labels": {"sources": list(sources), **by_source, "right": int(y.sum()), "wrong": int(len(y) - y.sum()),
                   "other_model": other_model},
        "feature": feature,
        "previous": {"method": old.method, "feature": old.feature, "params": old.params(),
                     "artifact": tc.calibrator.artifact, "version": previous},
    }
    new.metrics = {"heldout": held, "fit": fit}
    saved = save_calibrator(new, path)
    link, kept = activate_keeping(saved, tier) if do_activate else (None, None)
    warning = None
    if link is not None and (configured is None or Path(link).resolve() != configured.resolve()):
        warning = (f"the config reads tier {tier!r}'s calibrator from "
                   f"{configured if configured is not None else 'an inline calibrator'}, not {link}: "
                   f"point it there (calibrator: {{artifact: {link}}}) for a reload to use this version")
    fit_warnings = list(new.fit_warnings())
    if other_model:
        fit_warnings.append(others_text)
    if extrapolated:
        fit_warnings.append(_extrapolation_text(tier, coverage) + ": the held-out comparison covers only the "
                            "labelled range; label the answers the tier keeps (feedback, or a sampled shadow that "
                            "escalates them) before using this version")
    if overridden_by:
        fit_warnings.append(f"policies {', '.join(overridden_by)} use their own calibrator for tier {tier!r} "
                            f"(policies.<name>.calibrators.{tier}): this version replaces the tier's own only, "
                            "not theirs; the old column compares with the calibrator that served each answer")
    return {"report": "recalibrate", "tier": tier, "method": new.method, "feature": feature,
            "params": new.params(), "version": version, "artifact": str(saved),
            "activated": None if link is None else str(link),
            "replaced_file_kept_as": None if kept is None else str(kept), "n": len(rows), "n_fit": int(len(train)),
            "n_heldout": int(len(test)), "labels": new.fitted_on["labels"],
            "old": {"method": old.method, "params": old.params(), "version": previous},
            "heldout": held, "fit": fit,
            "ece_old": held["old"]["ece"], "ece_new": held["new"]["ece"], "warning": warning,
            "coverage": coverage, "policies_with_own_calibrator": overridden_by, "fit_warnings": fit_warnings}


def _extrapolation_text(tier: str, cov: dict[str, Any]) -> str:
    lo, hi = cov["labelled_range"]
    return (f"the labels cover the {cov['feature']} of tier {tier!r} from {lo:.3g} to {hi:.3g} only, and "
            f"{100 * cov['outside_share']:.0f}% of its {cov['answers']:,} answers in the ledger lie outside that "
            f"range (it kept {cov['kept_answers']:,}, of which {cov['kept_labelled']:,} are labelled): the new "
            "calibrator is extrapolated there")


def recalibrate_text(rep: dict[str, Any]) -> str:
    h = rep["heldout"]
    lab = rep["labels"]
    lines = [f"tier {rep['tier']}: {rep['n']} labelled answers ({lab['feedback']} from feedback, "
             f"{lab['agreement']} from agreement; {lab['right']} right, {lab['wrong']} wrong), "
             f"fit on {rep['n_fit']}, held out {rep['n_heldout']}",
             f"old: {rep['old']['method']} ({_brief(rep['old']['params'])}), version {rep['old']['version']}",
             f"new: {rep['method']} ({_brief(rep['params'])}) on {rep['feature']}, version {rep['version']}", "",
             f"{'held-out metric':<18}{'old':>10}{'new':>10}"]
    for k in ("ece", "ece_equal_mass", "brier", "nll", "auroc", "mean_confidence", "accuracy"):
        o, n = h["old"].get(k), h["new"].get(k)
        lines.append(f"{k:<18}{_f(o):>10}{_f(n):>10}")
    lines += [f"warning: {w}" for w in rep.get("fit_warnings", ())]
    lines += ["", f"artifact: {rep['artifact']}"]
    if not rep["activated"]:
        lines.append(f"to use it: set tiers.{rep['tier']}.calibrator.artifact to it (or rerun with --activate), "
                     "then POST /admin/reload or kill -HUP the server")
    else:
        lines.append(f"activated: {rep['activated']} -> {Path(rep['artifact']).name}"
                     + ("" if rep.get("warning") else " (POST /admin/reload or kill -HUP the server to use it)"))
        if rep.get("replaced_file_kept_as"):  # said whether or not the config reads that link
            lines.append(f"the file {Path(rep['activated']).name} was a file, not a link: kept as "
                         f"{rep['replaced_file_kept_as']}")
        if rep.get("warning"):
            lines.append(f"warning: {rep['warning']}")
    return "\n".join(lines)


def _f(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


def _brief(params: dict[str, Any]) -> str:
    small = {k: v for k, v in params.items() if isinstance(v, (int, float))}
    return " ".join(f"{k}={v:.4g}" for k, v in small.items()) if small else f"({len(params)} params)"


# --- reloading a running engine --------------------------------------------------------------------


def authorize_admin(config: Config, caller: Any) -> None:
    """Admin endpoints: a key whose user tier has ``admin: true``, or anyone when the server is open."""
    if not config.auth.keys and not config.auth.required:
        return
    limits = getattr(caller, "limits", None)
    if limits is None or not getattr(limits, "admin", False):
        raise PermissionDeniedError(f"user tier {getattr(caller, 'user_tier', None)!r} may not use admin endpoints "
                                    "(set admin: true on its user tier)", code="admin_only")


#: the fields of a tier that change its answers (and so their logprobs): a calibrator fit on the new ones is
#: not applied before they are (a restart)
_ANSWER_FIELDS = frozenset({"backend", "model", "options", "providers", "top_logprobs"})


def _unless_held(new: dict[str, Any], old: dict[str, Any], held: set[str]) -> dict[str, Any]:
    """A policy's per-tier settings (thresholds, calibrators): the new ones, but the old for ``held`` tiers."""
    return {**{t: v for t, v in new.items() if t not in held}, **{t: v for t, v in old.items() if t in held}}


def _plan_access(old: Config, new: Config, running: set[str], not_applied: list[str]) -> tuple[Any, Any]:
    """The user tiers and keys a reload applies (a key revoked, a limit changed: at once, no restart), else the
    running ones with the reason in ``not_applied``: user tiers allowing models this server does not run; keys
    of user tiers it would not have; no keys where there were, which would open the server to anyone."""
    user_tiers = old.user_tiers
    if new.user_tiers != old.user_tiers:
        unknown = sorted({m for ut in new.user_tiers.values() for m in ut.allowed_models} - running)
        # a tier's max_tokens waits for a restart: the new limits are judged against the running tiers'
        too_low = [why for n, ut in new.user_tiers.items() if (why := tokens_per_minute_problem(n, ut, old.tiers,
                                                                                                 old.policies))]
        if unknown:
            not_applied.append(f"section 'user_tiers' (allowed_models names {', '.join(map(repr, unknown))}, "
                               "which this server does not run)")
        elif too_low:
            not_applied.append(f"section 'user_tiers' (on the running tiers, {too_low[0]})")
        else:
            user_tiers = new.user_tiers
    auth = old.auth
    if new.auth != old.auth:
        named = {k.user_tier for k in new.auth.keys} | ({new.auth.anonymous_user_tier} - {None})
        if missing := sorted(named - set(user_tiers)):
            not_applied.append(f"section 'auth' (it names user tier(s) {', '.join(map(repr, missing))}, which "
                               "this server does not have)")
        elif (old.auth.keys or old.auth.required) and not (new.auth.keys or new.auth.required):
            not_applied.append("section 'auth' (without keys the server would be open to anyone: restart for "
                               "that, or set auth.required)")
        else:
            auth = new.auth
    if user_tiers is not old.user_tiers:  # the keys kept must still find their user tiers
        named = {k.user_tier for k in auth.keys} | ({auth.anonymous_user_tier} - {None})
        if missing := sorted(named - set(user_tiers)):
            not_applied.append(f"section 'user_tiers' (the running keys need {', '.join(map(repr, missing))})")
            user_tiers = old.user_tiers
    return user_tiers, auth


def _keep_shadows_user_tiers(old: Config, shadows: Any, user_tiers: Any, auth: Any, not_applied: list[str]
                             ) -> tuple[Any, Any]:
    """The running shadows (new ones were checked against ``user_tiers`` before) must still find the user
    tiers they name: else the user tiers are held back, and with them keys that need the new ones."""
    needed = {u for sh in shadows.values() for u in sh.user_tiers or ()}
    if missing := sorted(needed - set(user_tiers)):
        not_applied.append(f"section 'user_tiers' (the running shadows need {', '.join(map(repr, missing))})")
        user_tiers = old.user_tiers
        named = {k.user_tier for k in auth.keys} | ({auth.anonymous_user_tier} - {None})
        if auth is not old.auth and named - set(user_tiers):
            not_applied.append("section 'auth' (its keys need the user tiers held back)")
            auth = old.auth
    return user_tiers, auth


def _admin_warnings(old: Config, user_tiers: Any, auth: Any) -> list[str]:
    """A reload that leaves no key able to call POST /admin/reload (on a server that has keys) is applied (a
    leaked admin key must be revocable at once) but said: from then on only SIGHUP or a restart reloads."""
    def can_reload(uts: Any, au: Any) -> bool:  # an open server lets anyone; a keyed one, an admin key
        names = {k.user_tier for k in au.keys} | ({au.anonymous_user_tier} - {None})
        return not (au.keys or au.required) or any(uts[n].admin for n in names if n in uts)

    if can_reload(old.user_tiers, old.auth) and not can_reload(user_tiers, auth):
        return ["no key may call POST /admin/reload any more (no user tier with admin: true has a key); "
                "SIGHUP still reloads"]
    return []


def _plan(engine: Any, config_path: str | None
          ) -> tuple[Config, dict[str, Calibrator], dict[str, dict[str, Calibrator]], Any, dict[str, Any]]:
    """Build everything a reload swaps in, without touching the engine (raises ConfigError on any problem)."""
    from cascade.engine import build_calibrator
    from cascade.shadow import ShadowSet

    old: Config = engine.config
    # the environment the server started with: less the variables whose flags (--port...) it was given
    new = load_config(config_path, environ=environ_without_flags(os.environ, old._cli_overrides)) \
        if config_path else old
    not_applied: list[str] = []
    tiers, cals = [], {}
    held: set[str] = set()  # tiers whose answers would change: their thresholds and calibrators stay too
    new_tiers = {t.name: t for t in new.tiers}
    for tc in old.tiers:
        nt = new_tiers.get(tc.name)
        if nt is None:  # it runs on as it is (its artifact may be gone with it)
            not_applied.append(f"tier {tc.name!r} was removed")
            nt = tc
            held.add(tc.name)
        # a reload swaps thresholds and calibrators; any other change to a tier (its price, max_tokens,
        # backend options...) needs a restart: said, never silently ignored
        swapped = {"threshold", "calibrator"}
        old_d, new_d = tc.model_dump(exclude=swapped), nt.model_dump(exclude=swapped)
        if old_d != new_d:
            fields = sorted(k for k in old_d if old_d[k] != new_d.get(k))
            note = ""
            if _ANSWER_FIELDS.intersection(fields):  # a calibrator fit on the new model's answers would judge
                held.add(tc.name)                    # the old one's until the restart: kept with the model
                note = " (so its threshold and calibrators, here and in policies, are kept too)"
            not_applied.append(f"tier {tc.name!r}: {', '.join(fields)}{note}")
        merged = tc if tc.name in held else tc.model_copy(update={"threshold": nt.threshold,
                                                                  "calibrator": nt.calibrator})
        tiers.append(merged)  # a held tier keeps its calibrator as it runs, not re-read (the file may be the new one)
        cals[tc.name] = engine.tiers[tc.name].calibrator if tc.name in held else \
            build_calibrator(merged.calibrator, tier=tc.name, top_logprobs=merged.top_logprobs)
    not_applied += [f"new tier {n!r}" for n in new_tiers if n not in engine.tiers]
    policies = {}
    kept_policies: set[str] = set()  # removed from the file, or another chain: they run on as they are
    for name, pol in old.policies.items():
        np_ = new.policies.get(name)
        if np_ is not None and np_.chain == pol.chain:
            # (its description too: what GET /v1/models shows of it, no decision)
            policies[name] = pol.model_copy(update={"thresholds": _unless_held(np_.thresholds, pol.thresholds, held),
                                                    "calibrators": _unless_held(np_.calibrators, pol.calibrators,
                                                                                held),
                                                    "description": np_.description})
        else:
            policies[name] = pol
            kept_policies.add(name)
            not_applied.append(f"policy {name!r} " + ("was removed" if np_ is None else "changed its chain"))
    not_applied += [f"new policy {n!r}" for n in new.policies if n not in old.policies]
    user_tiers, auth = _plan_access(old, new, set(policies) | set(engine.tiers), not_applied)
    for section in ("models", "default_policy", "drift", "cache"):
        if getattr(new, section) != getattr(old, section):
            not_applied.append(f"section {section!r}")
    # server and ledger, but for what `cascade serve --host/--port/--ledger` overrode (the command line's
    # value stays in force: a change in the file would not apply after a restart with the same command either)
    given = old._cli_overrides
    for section in ("server", "ledger"):
        overridden = {k.partition(".")[2] for k in given if k.startswith(section + ".")}
        old_d = getattr(old, section).model_dump(exclude=overridden)
        new_d = getattr(new, section).model_dump(exclude=overridden)
        if old_d != new_d:
            not_applied.append(f"section {section!r}: " + ", ".join(sorted(k for k in old_d if old_d[k] != new_d[k])))
    shadows, kept_shadows = old.shadows, None

    def runs(s: Any) -> bool:
        """Whether the server can run shadow ``s`` as the file says: on the chain it will walk (its own, else
        its policy's as the server runs it: a policy's new chain waits for a restart), whose tiers run here,
        and which holds every tier its thresholds and calibrators name (else those would be ignored, the
        shadow judged as its live policy)."""
        if s.of not in policies:
            return False
        chain = s.chain or policies[s.of].chain
        return (all(t in engine.tiers for t in chain) and set(s.thresholds) | set(s.calibrators) <= set(chain)
                and set(s.user_tiers or ()) <= set(user_tiers))

    if new.shadows != old.shadows:
        if all(runs(s) for s in new.shadows.values()):
            shadows = new.shadows
        else:
            not_applied.append("shadows (they name tiers, policies or user tiers this server does not run)")
            kept_shadows = engine.shadows  # they run on as they are, their calibrators as loaded
    user_tiers, auth = _keep_shadows_user_tiers(old, shadows, user_tiers, auth, not_applied)
    merged_cfg = old.model_copy(update={"tiers": tiers, "policies": policies, "shadows": shadows,
                                        "user_tiers": user_tiers, "auth": auth})
    def policy_calibrator(policy: str, tier: str, cc: Any) -> Calibrator:
        """A held tier's as it runs (not re-read: the file may hold the new model's), and a kept policy's (its
        artifacts may be gone with it, as a removed tier's), else built anew."""
        kept = engine.policy_calibrators.get(policy, {}).get(tier) if tier in held or policy in kept_policies \
            else None
        return kept or build_calibrator(cc, tier=tier, where=f"policies.{policy}.calibrators.{tier}",
                                        top_logprobs=engine.tiers[tier].config.top_logprobs)

    policy_cals = {name: {t: policy_calibrator(name, t, cc) for t, cc in pol.calibrators.items()}
                   for name, pol in merged_cfg.policies.items() if pol.calibrators}
    shadow_set = ShadowSet(merged_cfg, engine.tiers, policy_cals,
                           tier_calibrators={n: cals.get(n, t.calibrator) for n, t in engine.tiers.items()},
                           kept=kept_shadows)
    warnings = _admin_warnings(old, user_tiers, auth)
    if new is not old:  # what a restart on the file would meet: said now, not when the server next starts
        from cascade.engine import check_backends

        try:
            check_backends(new)
        except CascadeError as exc:  # (a backend this host cannot load, too: BackendUnavailableError)
            warnings.append(f"this file would not start a server: {exc.message}")
        running = set(old.price_warnings())
        warnings += [w for w in new.price_warnings() if w not in running]
    return merged_cfg, cals, policy_cals, shadow_set, {"not_applied": not_applied, "warnings": warnings}


def _decisions(engine: Any) -> tuple:
    """What decides which tier answers: every tier's threshold and calibrator, every policy's own."""
    tiers = {n: (t.config.threshold, t.calibrator.to_dict()) for n, t in engine.tiers.items()}
    policies = {n: (dict(p.thresholds), {t: c.to_dict() for t, c in engine.policy_calibrators.get(n, {}).items()})
                for n, p in engine.config.policies.items()}
    return tiers, policies


def reload_engine(engine: Any, config_path: str | None = None) -> dict[str, Any]:
    """Swap a running engine's calibrators, thresholds and shadows for those of ``config_path`` (or, with no
    path, re-read the calibrator artifacts the current config names). All or nothing: any error leaves the
    engine as it was. Call it on the engine's event loop thread (as the server does)."""
    return _swap(engine, *_plan(engine, config_path), config_path)


def _swap(engine: Any, cfg: Config, cals: dict[str, Calibrator], policy_cals: dict[str, dict[str, Calibrator]],
          shadows: Any, extra: dict[str, Any], config_path: str | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    before = _decisions(engine)
    tcs = {t.name: t for t in cfg.tiers}
    for name, cal in cals.items():
        tier = engine.tiers[name]
        changed = (cal.to_dict() != tier.calibrator.to_dict()) or tcs[name].threshold != tier.config.threshold
        tier.config, tier.calibrator = tcs[name], cal  # a request's route holds what it resolved with
        summary[name] = {"method": cal.method, "feature": cal.feature, "artifact": tcs[name].calibrator.artifact,
                         "version": cal.fitted_on.get("version"), "threshold": tcs[name].threshold,
                         "changed": changed}
    engine.config = cfg
    engine.policy_calibrators = policy_cals
    engine.shadows = shadows
    # the cached answers were decided by the old thresholds and calibrators: the new ones may not give them (a
    # reload that changed none, as a logrotate hook's SIGHUP, keeps them)
    cleared, decided_anew = 0, _decisions(engine) != before
    if getattr(engine, "cache", None) is not None and decided_anew:
        cleared = engine.cache.clear()
    out = {"object": "reload", "reloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "source": config_path or "current config (artifacts re-read)", "tiers": summary,
           "policy_thresholds": {n: dict(p.thresholds) for n, p in cfg.policies.items()},
           "policy_calibrators": {n: {t: {"method": c.method, "version": c.fitted_on.get("version")}
                                      for t, c in tc.items()} for n, tc in policy_cals.items()},
           "shadows": sorted(cfg.shadows), "decisions_changed": decided_anew, "cache_cleared": cleared, **extra}
    from cascade.engine import notify

    notify(getattr(engine, "reload_listeners", []), out)
    changed = [f"{n} v{s['version']}" if s["version"] else n for n, s in summary.items() if s["changed"]]
    # a policy's own thresholds and calibrators decide too: a reload that changed only those is no "no change"
    policies_before, policies_after = before[1], _decisions(engine)[1]
    changed += [f"policy {n!r}" for n, d in policies_after.items() if d != policies_before.get(n)]
    log.info("reloaded calibrators from %s: %s%s", out["source"], ", ".join(changed) or "no change",
             f"; not applied (restart): {', '.join(extra['not_applied'])}" if extra["not_applied"] else "")
    for warning in extra["warnings"]:
        log.warning("reload: %s", warning)
    return out


async def reload_engine_async(engine: Any, config_path: str | None = None) -> dict[str, Any]:
    """:func:`reload_engine` for the server: files are read off the event loop, the swap happens on it,
    and concurrent reloads run one after another."""
    lock = engine.__dict__.setdefault("_cascade_reload_lock", asyncio.Lock())
    async with lock:
        plan = await asyncio.to_thread(_plan, engine, config_path)
        return _swap(engine, *plan, config_path)


def install_sighup(engine: Any, config_path: str | None) -> Callable[[], None] | None:
    """Reload on SIGHUP (main thread of a Unix server only); returns a function that removes the handler,
    or None where no handler could be installed (e.g. a server running in a thread)."""
    sig = getattr(signal, "SIGHUP", None)
    if sig is None:
        return None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def run() -> None:
        from cascade.errors import CascadeError

        started = time.perf_counter()
        try:
            await reload_engine_async(engine, config_path)
            log.info("SIGHUP reload done in %.1f ms", (time.perf_counter() - started) * 1e3)
        except CascadeError as exc:
            log.error("SIGHUP reload failed, the previous calibrators stay: %s", exc)
        except Exception:  # noqa: BLE001 - a bad reload must never take the server down
            log.exception("SIGHUP reload failed, the previous calibrators stay")

    def handler() -> None:
        t = loop.create_task(run())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(sig, handler)
    except (ValueError, RuntimeError, NotImplementedError):
        return None

    def ignored() -> None:
        log.info("SIGHUP ignored: the server is shutting down")

    def remove() -> None:
        # the reload handler is swapped for one that only logs, never removed: removing it puts back SIGHUP's
        # default (ending the process) until a SIG_IGN after it, and a SIGHUP landing in between (a logrotate
        # hook during the shutdown) cut the shutdown short, in-flight shadow samples and all (seen once in CI).
        # The loop removes it when it closes; run_server ignores SIGHUP from then on
        try:
            loop.add_signal_handler(sig, ignored)
        except (ValueError, RuntimeError):  # pragma: no cover - loop already closed, or not the main thread
            pass

    return remove


__all__ = ["LABEL_SOURCES", "activate", "artifact_path", "authorize_admin", "install_sighup", "labelled_answers",
           "recalibrate", "recalibrate_text", "reload_engine", "reload_engine_async"]
