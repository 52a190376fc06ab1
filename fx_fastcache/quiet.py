"""Silence, around one call, the warnings that our own use of torch internals causes.

Why: ``torch.export``/``torch.onnx`` and transformers print notices a user of this library
cannot act on: a pytree ``LeafSpec`` FutureWarning raised while we copy exported programs;
"torchvision is not installed. Skipping torchvision::nms" from the ONNX exporter's op
registry, which needs no torchvision here; transformers' "`CLIPImageProcessor` requires
torchvision (not installed)" when a diffusers pipeline module is imported, for an image
processor that is never used.  They are filtered only inside :func:`library_noise_silenced`,
by message and origin, never globally: the same warnings raised by the user's own code
outside these calls stay visible.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

__all__ = ["library_noise_silenced", "quiet_deepcopy"]

#: (category, message regex) of warnings caused by torch internals we call, not by the user
_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r".*(LeafSpec|TreeSpec|treespec).*"),  # torch.utils._pytree, via copy/pickle of specs
    (UserWarning, r".*torchvision is not installed.*"),
)
_TORCH_MODULES = r"(torch|torchvision|onnxscript)(\.|$)"
#: loggers that print the same kind of notices (torch's own logging, not the warnings module)
_LOGGERS: tuple[tuple[str, str], ...] = (
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    # importing diffusers' SD3/Flux pipelines touches image processors they do not use here
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
)


class _DropMessages(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.needle not in record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True


@contextlib.contextmanager
def library_noise_silenced() -> Iterator[None]:
    """Within the block: no torch-internal FutureWarning/DeprecationWarning, no torchvision notice."""
    filters = []
    with warnings.catch_warnings():
        for category, message in _WARNINGS:
            warnings.filterwarnings("ignore", category=category, message=message)
        warnings.filterwarnings("ignore", category=FutureWarning, module=_TORCH_MODULES)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=_TORCH_MODULES)
        for name, needle in _LOGGERS:
            f = _DropMessages(needle)
            logging.getLogger(name).addFilter(f)
            filters.append((name, f))
        try:
            yield
        finally:
            for name, f in filters:
                logging.getLogger(name).removeFilter(f)


def quiet_deepcopy(obj):
    """``copy.deepcopy(obj)`` without the pytree ``LeafSpec`` FutureWarning of copying exported graphs."""
    with library_noise_silenced():
        return copy.deepcopy(obj)
