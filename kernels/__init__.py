"""Fused Triton kernels. Imports nothing else from sur_cache."""

from .attention_calibration import attention_calibration, attention_calibration_forward_op
from .reference import attention_calibration_reference

__all__ = ["attention_calibration", "attention_calibration_forward_op", "attention_calibration_reference"]
