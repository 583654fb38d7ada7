"""A policy fitted by ``cascade replay``, written as what the engine loads: calibrator artifacts and a policy.

``export_policy`` writes, into one folder, one calibrator artifact per consulted tier but the last and a
``policy.yaml`` holding the engine's ``policies.<name>`` section (``chain``, ``thresholds``,
``calibrators``), ready to merge into a config whose tiers carry the same names as the data's models.

Only a policy whose tiers decide on their own calibrated confidence is exportable (``replay
--no-features``): the engine's escalation decision (``cascade.policy.decide``) reads one answer's
features, so agreement between tiers and the answer-format features of the replay policy have no
counterpart there. The engine's rule is the replay's rule: accept when the calibrated confidence is at
least the threshold, so on the same features the engine takes the same decisions as the replay.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from calibration.calibrators import save_calibrator
from calibration.features import FEATURE_NAMES, score_source
from calibration.replay import FittedPolicy
from cascade.errors import ConfigError
from cascade.paths import expand_path

#: why a policy with feature steps does not export (``replay`` checks it before fitting, too)
NEEDS_OWN_CONFIDENCE = ("--export-policy needs --no-features: the engine decides on each tier's own calibrated "
                        "confidence, and the agreement features have no counterpart there")


def check_policy_name(name: str, chain: list[str]) -> str:
    """``name``, checked before any work by the engine's own config validation (``cascade.config.parse_config``)
    on the section ``export_policy`` will write, in a config whose tiers are named as ``chain``: an empty name,
    or one that is also a tier's, is refused there, so it is refused here (ConfigError, one line)."""
    from cascade.config import parse_config

    tiers = [{"name": t, "backend": "openai", "model": t} for t in chain]
    source = "(the exported policy)"
    try:
        parse_config({"tiers": tiers, "policies": {name: {"chain": list(chain)}}}, source=source)
    except ConfigError as exc:
        why = exc.message.removeprefix(f"invalid config {source}: ").removeprefix("(top level): ")
        flag = f"--policy-name {name!r}" if why.startswith("policies") else "--export-policy"
        raise ConfigError(f"{flag}: the engine's config would refuse the exported policy: {why}") from None
    return name


def export_policy(policy: FittedPolicy, out_dir: str | Path, *, name: str, feature: str,
                  train_path: str, n_train: int) -> dict[str, Any]:
    """Write the artifacts and ``policy.yaml`` into ``out_dir``; returns what was written."""
    import yaml

    if any(step.logistic is not None for step in policy.steps):
        raise ConfigError(NEEDS_OWN_CONFIDENCE)
    out = expand_path(out_dir, "--export-policy")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--export-policy: cannot create {out}: {exc}") from exc
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    thresholds: dict[str, float] = {}
    calibrators: dict[str, dict[str, str]] = {}
    artifacts = []
    for step, threshold in zip(policy.steps, policy.thresholds, strict=True):
        cal = policy.tiers[step.tier].calibrator.with_feature(feature)  # replay names every score raw_conf_logprob
        cal.fitted_on = {**cal.fitted_on, "data": str(Path(train_path).resolve()), "model": step.tier,
                         "n": int(n_train), "date": date, "by": "cascade replay --export-policy",
                         "feature_source": score_source(feature)}
        path = save_calibrator(cal, out / f"{_file_stem(step.tier)}.json")
        artifacts.append(str(path))
        calibrators[step.tier] = {"artifact": str(path.resolve())}
        thresholds[step.tier] = float(threshold)  # a consulted tier always has one (None: not consulted)
    section: dict[str, Any] = {"chain": list(policy.subchain)}
    if thresholds:
        section["thresholds"] = thresholds
        section["calibrators"] = calibrators
    section["description"] = (f"fitted by cascade replay on {Path(train_path).name} (n={n_train}), verdict "
                              f"{policy.verdict}, max quality drop {policy.config.max_quality_drop:g}")
    header = [f"# written by `cascade replay --export-policy` on {date}",
              f"# TRAIN: {Path(train_path).resolve()} ({n_train} questions); score: {feature}",
              "# merge under `policies:` of a config whose tiers are named as the models above"]
    if feature not in FEATURE_NAMES:
        header.append(f"# the calibrators read the stored {feature}, which the engine does not compute: the engine "
                      "refuses them until each entry names its engine equivalent, e.g. `feature: "
                      "first_token_logprob` for an answer-letter logprob (a self-check logprob has none)")
    text = "\n".join(header) + "\n" + yaml.safe_dump({"policies": {name: section}}, sort_keys=False)
    policy_file = out / "policy.yaml"
    policy_file.write_text(text)
    return {"dir": str(out), "policy": str(policy_file), "name": name, "artifacts": artifacts}


def _file_stem(tier: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tier)


__all__ = ["check_policy_name", "export_policy"]
