"""Policy registry: name → class."""
from .base import Policy
from .chi2 import Chi2Policy
from .first_block_cache import FirstBlockCachePolicy
from .planned import PlannedPolicy
from .schedule import SchedulePolicy
from .step_forecast import StepForecastPolicy
from .teacache import TeaCachePolicy

POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (Chi2Policy, StepForecastPolicy, FirstBlockCachePolicy, TeaCachePolicy, SchedulePolicy, PlannedPolicy)
}

__all__ = ["POLICIES", "Policy"]
