"""Calibration: logprob features, calibrators, metrics and threshold selection.

Importing this package pulls in numpy only. Fitting helpers that use netcal, scipy or matplotlib import
them inside the functions that need them.
"""

from calibration.calibrators import (
    Calibrator,
    TemperatureScaling,
    calibrator_from_dict,
    load_calibrator,
    save_calibrator,
)
from calibration.features import FEATURE_NAMES, extract_features

__all__ = [
    "Calibrator",
    "TemperatureScaling",
    "calibrator_from_dict",
    "load_calibrator",
    "save_calibrator",
    "FEATURE_NAMES",
    "extract_features",
]
