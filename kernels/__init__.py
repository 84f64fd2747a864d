"""Fused Triton kernels. Imports nothing else from sur_cache."""

from .attention_calibration import AttentionCalibrationFunction, attention_calibration
from .reference import attention_calibration_reference

__all__ = ["AttentionCalibrationFunction", "attention_calibration", "attention_calibration_reference"]
