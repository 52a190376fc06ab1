"""Fallback registry: name → class.  Add a variant by adding a file and one entry here."""
from ..runtime.store import CalibrationStore
from .base import Fallback, StreamInfo
from .forecast import ForecastFallback
from .forecast_blend import ForecastBlendFallback
from .linear import LinearFallback
from .residual import ResidualFallback
from .residual_linear import ResidualLinearFallback

FALLBACKS: dict[str, type[Fallback]] = {
    "residual": ResidualFallback,
    "residual_linear": ResidualLinearFallback,
    "forecast": ForecastFallback,
    "forecast_blend": ForecastBlendFallback,
    "linear": LinearFallback,
}

__all__ = ["FALLBACKS", "CalibrationStore", "Fallback", "StreamInfo"]
