"""What a captured graph froze besides tensor values, and a cheap per-call check that it still holds.

Why this exists: ``torch.export`` traces the model once.  The graph keeps the model's Parameter and
buffer *objects*, so in-place edits of their values reach it, and nothing else: a submodule,
Parameter or buffer replaced on the original model (a LoRA adapter injected or unloaded,
``fuse_qkv_projections``, ``load_state_dict(assign=True)``, a block appended or deleted), another
attention processor (``set_attn_processor``) or a processor's setting (IP-Adapter's ``scale``, the
attention backend), a forward hook added or removed, or a peft LoRA
layer's scale, enabled or merged state (``set_adapters``, ``disable_adapters``, ``fuse_lora``)
left the optimized model computing the model as it was, silently.  :class:`ModelWatch` notices
such a change at the next call, and the module re-captures.

Cost: comparing the whole module tree takes about 1–3 ms on a Flux-sized model, so it runs only
after something in the process registered a module, parameter, buffer or hook (global
registration hooks installed once, and torch's hook-handle counter).  Otherwise a call checks two
integers and short lists: 5–20 µs (attention processors, module containers, modules that had
hooks, peft layers; the peft state is the longest, about 0.3 ms per call with 500 LoRA layers).
Plain Python attributes a forward reads (a custom ``self.scale``) are not watched: they are frozen
at capture like any traced constant; ``opt.drop_graphs()`` re-captures.
"""
from __future__ import annotations

import bisect
import enum
import operator
from typing import Any

import torch.nn as nn
import torch.nn.modules.module as torch_module
from torch.utils.hooks import RemovableHandle

__all__ = ["ModelWatch", "active_attention_backend", "attention_processor"]

#: Registrations of modules, parameters and buffers anywhere in the process since the hooks went in.
_REGISTRATIONS = [0]
_INSTALLED = [False]
#: Module types whose entries can be deleted (``del blocks[0]``), which no registration hook reports.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_WATCHED = ("_modules", "_parameters", "_buffers", *_HOOK_DICTS)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def _count(*args: Any) -> None:
    _REGISTRATIONS[0] += 1


def _install() -> None:
    """The process-wide registration hooks (once): one counter increment per registration anywhere."""
    if not _INSTALLED[0]:
        torch_module.register_module_module_registration_hook(_count)
        torch_module.register_module_parameter_registration_hook(_count)
        torch_module.register_module_buffer_registration_hook(_count)
        _INSTALLED[0] = True


def _events() -> tuple[int, int]:
    return _REGISTRATIONS[0], RemovableHandle.next_id


def attention_processor(module: nn.Module) -> Any:
    """An attention module's processor: a plain attribute, or a child module (IP-Adapter's processors)."""
    return module.__dict__.get("processor", module._modules.get("processor"))


_PLAIN = (bool, int, float, str, enum.Enum, type(None))


def _processor_state(processor: Any) -> tuple:
    """An attention processor's plain settings, which its traced call reads as constants: IP-Adapter's
    ``scale`` (``set_ip_adapter_scale``), the attention backend (``set_attention_backend``).  (Not an
    ``nn.Module`` processor's ``training`` flag, which ``model.eval()`` sets and no trace reads.)"""
    d = getattr(processor, "__dict__", None)
    if d is None:
        return ()
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items() if k != "training" and (
        isinstance(v, _PLAIN) or (isinstance(v, (list, tuple)) and all(isinstance(e, _PLAIN) for e in v))))


def active_attention_backend() -> Any:
    """diffusers' process-wide attention backend, which processors without their own follow: any model's
    ``set_attention_backend`` (or the ``attention_backend`` context manager) sets it (``None``: this
    diffusers has none)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        return _AttentionBackendRegistry._active_backend
    except (ImportError, AttributeError):
        return None


def _is_peft_layer(module: nn.Module) -> bool:
    d = module.__dict__
    return "merged_adapters" in d and "_disable_adapters" in d


def _peft_state(module: nn.Module) -> tuple:
    """A peft ``BaseTunerLayer``'s run-time state: the active adapters, disabled, merged, and LoRA scales."""
    d = module.__dict__
    active, scaling = d.get("_active_adapter"), d.get("scaling")
    # scales rounded: diffusers scales and unscales them around every eager forward that takes a LoRA
    # ``scale`` (x * s / s), which can move the last bit
    return (tuple(active) if isinstance(active, list) else active, d["_disable_adapters"], tuple(d["merged_adapters"]),
            tuple((k, round(v, 9) if isinstance(v, float) else v) for k, v in scaling.items())
            if isinstance(scaling, dict) else None)


def _flat(modules: Any) -> tuple[list[Any], list[int]]:
    """The objects a trace of these modules depends on by identity, in one list: per module its
    children, parameters, buffers and forward hooks (each dict, then its entries: the dicts keep an
    added or removed entry from lining up with the snapshot) and its attention processor; and where
    each module's part starts."""
    out: list[Any] = []
    starts: list[int] = []
    for m in modules:
        starts.append(len(out))
        d = m.__dict__
        for k in _WATCHED:
            x = d[k]
            out.append(x)
            out.extend(x.values())
        out.append(d.get("processor"))
    return out, starts


class ModelWatch:
    """A snapshot of ``model``'s module tree, taken when its graphs were captured."""

    def __init__(self, model: nn.Module, hooks: tuple = ()) -> None:
        _install()
        self.model = model
        #: the diffusers hooks at capture (the module compares its per-call scan with them: they wrap
        #: ``forward`` without any torch registration)
        self.hooks = hooks
        self._events = _events()
        self._names = [name or "(root)" for name, _ in model.named_modules()]
        modules = list(model.modules())
        self._flat, self._starts = _flat(modules)
        self._processors = [(m, attention_processor(m), _processor_state(attention_processor(m)))
                            for m in modules if "processor" in m.__dict__ or "processor" in m._modules]
        self._containers = [(m, m.__dict__["_modules"], len(m.__dict__["_modules"]))
                            for m in modules if isinstance(m, _CONTAINERS)]
        self._hooked = [(m.__dict__[k], len(m.__dict__[k])) for m in modules for k in _HOOK_DICTS if m.__dict__[k]]
        self._peft = [(m, _peft_state(m)) for m in modules if _is_peft_layer(m)]
        self._global_hooks = self._global_hook_counts()
        self._attention_backend = active_attention_backend()

    @staticmethod
    def _global_hook_counts() -> tuple[int, ...]:
        return tuple(len(getattr(torch_module, k)) for k in _GLOBAL_HOOKS)

    def follow_moved(self, moved: dict[int, tuple[Any, Any]]) -> None:
        """The model moved (``.to()``): its buffers are new tensors (``id(old) -> (old, new)``), not a change."""
        self._flat = [moved[id(x)][1] if id(x) in moved and moved[id(x)][0] is x else x for x in self._flat]

    def changed(self) -> str | None:
        """What changed since the snapshot (``None``: nothing the graphs depend on)."""
        for m, p, state in self._processors:
            if attention_processor(m) is not p:
                return f"the attention processor of {self._name(m)} was replaced"
            if _processor_state(p) != state:
                return f"a setting of the attention processor of {self._name(m)} changed (its scale, attention backend, ...)"
        for m, d, n in self._containers:
            if m.__dict__["_modules"] is not d or len(d) != n:
                return f"entries of {self._name(m)} were added or deleted"
        if active_attention_backend() != self._attention_backend:
            return "diffusers' attention backend changed (set_attention_backend on this or another model)"
        if any(len(d) != n for d, n in self._hooked) or self._global_hook_counts() != self._global_hooks:
            return "a forward hook was added or removed"
        for m, state in self._peft:
            if _peft_state(m) != state:
                return f"the LoRA adapter state of {self._name(m)} changed (scale, enabled, active or merged adapters)"
        now = _events()
        if now != self._events:  # something registered somewhere in the process: compare the tree
            why = self._compare_tree()
            if why is not None:
                return why
            self._events = now  # read before the comparison: a registration during it is seen next time
        return None

    def _compare_tree(self) -> str | None:
        flat, _ = _flat(self.model.modules())
        if len(flat) == len(self._flat) and all(map(operator.is_, flat, self._flat)):
            return None
        i = next((i for i, (a, b) in enumerate(zip(flat, self._flat)) if a is not b), None)
        i = min(len(flat), len(self._flat)) if i is None else i
        name = self._names[bisect.bisect_right(self._starts, i) - 1]  # the first module that differs
        return f"a child, parameter, buffer, forward hook or attention processor of {name} was added, removed or replaced"

    def _name(self, module: nn.Module) -> str:
        return next((n for n, m in zip(self._names, self.model.modules()) if m is module), type(module).__name__)
