"""The escalation decision: one pure function of (features, calibrator, threshold).

No I/O, no clocks, no state: the same inputs always give the same decision, which is what makes shadow
policies and offline replays exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from calibration.calibrators import Calibrator
from cascade.types import Decision


def decide(features: Mapping[str, float], calibrator: Calibrator, threshold: float, *,
           is_last: bool) -> Decision:
    """Escalate when the calibrated confidence is below ``threshold``; the last tier always answers.

    An answer with no tokens is escalated whatever its confidence (there is nothing to serve), and so is one
    whose score is not a number or -inf (no confidence: an offline replay never accepts one either).
    """
    if features.get("n_tokens", 1.0) <= 0:
        conf = 0.0
        if is_last:
            return Decision(False, "last tier always answers (empty answer)", conf)
        return Decision(True, "empty answer", conf)
    score = features.get(calibrator.feature)
    if score is not None and not math.isfinite(score):
        if is_last:
            return Decision(False, "last tier always answers (no confidence)", 0.0)
        return Decision(True, f"no confidence ({calibrator.feature} is {score})", 0.0)
    conf = calibrator.predict_one(features)
    if not math.isfinite(conf):
        conf = 0.0
    if is_last:
        return Decision(False, "last tier always answers", conf)
    if conf < threshold:
        return Decision(True, f"confidence {conf:.3f} < threshold {threshold:.3f}", conf)
    return Decision(False, f"confidence {conf:.3f} >= threshold {threshold:.3f}", conf)
