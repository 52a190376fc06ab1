"""Export of the rewritten model: skip schedules, ONNX with explicit state, runners, TensorRT.

``fx_fastcache.export.schedule`` (record / replay a steps × blocks skip table),
``fx_fastcache.export.onnx`` (``export_onnx``), ``fx_fastcache.export.runner`` (``OnnxRunner``)
and ``fx_fastcache.export.tensorrt`` (isolated TensorRT path).  onnx, onnxruntime and
tensorrt are imported only by the functions that need them.
"""
from .schedule import Schedule, apply_schedule, installed_schedule, optimize_with_schedule, record_schedule

__all__ = ["Schedule", "apply_schedule", "installed_schedule", "optimize_with_schedule", "record_schedule"]
