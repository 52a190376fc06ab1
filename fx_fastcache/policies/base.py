"""Who decides that a block may be approximated: the policy strategy interface.

A policy decides either once per step (``scope = "step"``: one decider module runs at an
anchor point and every block's guard reads its verdict) or per block (``scope = "block"``:
one decider per block).  Deciders are ``nn.Module``\\ s called inside the graph as
``decider(step, new_gen, ok, threshold, t, signal) -> pred`` where ``ok`` already folds in
warm-up, enable switch, forced compute and the fallback's readiness; ``pred`` is a 0-d bool
tensor (True = approximate).  A decider updates its own reference state with ``torch.where``
on ``pred``.  ``signal`` is what the policy looks at:

* ``"probe"``: the block's *modulated input* (the input of its first linear layer that reads
  the hidden states, e.g. ``attn1.to_q``), which sees the timestep through adaLN;
* ``"residual0"``: block 0's residual (output − input), available after block 0 ran;
* ``None``: nothing (precomputed schedules).

A policy also declares what it can do (class attributes below), so that no code outside
``policies/`` tests a policy by name: step dispatch, export and the benchmark read these.
Adding a policy is one file here plus one line in ``policies/__init__.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..calibration import Calibrator


class Policy:
    name: str = ""
    #: ``"step"``: one decision per step for every block after the anchor; ``"block"``: per block.
    scope: str = "block"
    signal: str | None = "probe"
    #: Where a step policy decides: "before_block0" or "after_block0".
    anchor: str = "before_block0"
    #: Decisions come from a table known before the step (``fastcache.set_schedule``): step dispatch
    #: reads them on the host without a sync.
    host_decidable: bool = False
    #: Decisions can be fed to an exported (stateless) graph as its ``skip`` input (ONNX/TensorRT).
    exportable: bool = False
    #: Calibration fits what the decisions depend on (uncalibrated: a default scale).
    needs_calibration: bool = False
    #: A peer's rule re-implemented here (First-Block-Cache, TeaCache): the fallback the peer uses,
    #: so the benchmark can run it as that peer; ``None`` for our own rules.
    peer_fallback: str | None = None
    #: The config field a benchmark sweeps to trade speed for fidelity.
    sweep_field: str = "cache_ratio_threshold"
    #: Calibration is made for the configured fallback's rule (``planned`` replays it): a calibration
    #: file made with another fallback is refused when loaded.
    plans_for_fallback: bool = False
    #: Store keys that only some calibrations hold (what a later step such as ``search_plan`` fitted):
    #: ``load_calibration`` drops them when the file lacks them, so the file's own state is installed,
    #: not what the model held before.  Host-side keys only: no captured graph reads them.
    optional_keys: tuple[str, ...] = ()
    #: Store keys sized by the calibration's step count: a file made for another step count replaces
    #: them all when loaded (as calibrating again with that count does), instead of failing on shapes.
    step_count_keys: tuple[str, ...] = ()

    def __init__(self, config) -> None:
        self.config = config

    @classmethod
    def decides_per_step(cls) -> bool:
        """One decision per step, readable before the blocks run (step dispatch can use it)."""
        return cls.scope == "step" or cls.host_decidable

    @staticmethod
    def install_table(store, blocks: list[str], table: torch.Tensor, device: torch.device) -> None:
        """Install a ``steps × blocks`` decision table (``host_decidable`` policies only)."""
        raise NotImplementedError

    @staticmethod
    def read_table(store, blocks: list[str]) -> torch.Tensor | None:
        """The installed decision table, or ``None`` (``host_decidable`` policies only)."""
        raise NotImplementedError

    @classmethod
    def measure_sensitivity(cls, opt, generate, metric=None) -> list[float]:
        """Weigh the planned steps by measured error growth (``policy="planned"`` only)."""
        raise ValueError(f"measure_sensitivity re-plans the steps of policy='planned'; this model uses "
                         f"policy={cls.name!r}: optimize(model, policy='planned') and calibrate it first")

    @classmethod
    def protect_steps(cls, opt, generate, floor_db, data_range=None) -> list[int]:
        """Always compute the steps whose skip alone breaks a sample (``policy="planned"`` only)."""
        raise ValueError(f"protect_steps re-plans the steps of policy='planned'; this model uses "
                         f"policy={cls.name!r}: optimize(model, policy='planned') and calibrate it first")

    @classmethod
    def search_plan(cls, opt, generate, fractions=None, data_range=None, max_runs=150,
                    objective="mean") -> dict[float, list[int]]:
        """Choose the planned steps on whole generations (``policy="planned"`` only)."""
        raise ValueError(f"search_plan searches the steps of policy='planned'; this model uses "
                         f"policy={cls.name!r}: optimize(model, policy='planned') and calibrate it first")

    @staticmethod
    def config_error(config) -> str | None:
        """Why ``config``'s other fields cannot work with this policy (``None``: they can); checked
        when the config is made, so a bad combination fails before any capture."""
        return None

    @staticmethod
    def steps_mismatch(store, steps: int) -> str | None:
        """Why a generation of ``steps`` steps does not fit what calibration fitted (``None``: it fits)."""
        return None

    @staticmethod
    def schedule_mismatch(store, timesteps: list[float]) -> str | None:
        """Why a generation whose steps ran ``timesteps`` (as the clock reads them) does not fit the schedule
        calibration fitted (``None``: it fits, or nothing was fitted for one)."""
        return None

    @staticmethod
    def configure_store(store, config, device) -> None:
        """Apply a changed run-time config field to the calibration store (``fastcache.configure``)."""

    @classmethod
    def calibrator(cls, config) -> Calibrator | None:
        """What calibration records and fits for this policy (``None``: nothing)."""
        return None

    # ``group``: the process group the tokens are split over (context parallelism) or ``None``;
    # a decider sums its statistic's sums over it (``runtime/distributed.py``).
    def make_step_decider(self, signal_shape: tuple[int, ...], device, dtype, store,
                          group=None) -> nn.Module | None:
        return None

    def make_block_decider(self, index: int, block: str, signal_shape: tuple[int, ...] | None, device, dtype,
                           store, group=None) -> nn.Module | None:
        return None

    def never_skip(self, index: int) -> bool:
        return False

    def span_groups(self, block_names: list[str], store) -> list[list[int]]:
        """Runs of consecutive blocks that always share this policy's decision (``span="auto"``,
        ``passes/group_spans.py``).  A step-level policy: one span of the blocks after its anchor
        (First-Block-Cache's block 0 alone, as it always computes); a per-block policy: one per block."""
        n = len(block_names)
        if self.scope == "step":
            lead = 1 if self.anchor == "after_block0" else 0
            return [[i] for i in range(min(lead, n))] + ([list(range(lead, n))] if n > lead else [])
        return [[i] for i in range(n)]


class Decider(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    def computed_count(self, new_gen: torch.Tensor) -> torch.Tensor:
        """Full computations seen in this generation (the ``n`` buffer, zero on a new one)."""
        return torch.where(new_gen, torch.zeros_like(self.n), self.n)

    def count_computed(self, n: torch.Tensor, pred: torch.Tensor) -> None:
        """``n ← n + 1`` if this step was computed (``pred`` False)."""
        self.n.copy_(n + (~pred).to(n.dtype))

    def reset(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if name in getattr(self, "_persistent_state", ()):
                continue
            buf.zero_()
