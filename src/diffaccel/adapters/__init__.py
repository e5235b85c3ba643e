"""Adapters: one file per architecture, and the registry that picks one for a model.

To support a new architecture, write an ``Adapter`` subclass (see ``base.py``) whose ``units``
lists the modules worth caching, and add it to ``ADAPTERS``.
"""

from __future__ import annotations

import torch

from diffaccel.adapters.base import Adapter, Unit
from diffaccel.adapters.dit import DiTAdapter
from diffaccel.adapters.flux import FluxAdapter
from diffaccel.adapters.pixart import PixArtAdapter
from diffaccel.adapters.sd3 import SD3Adapter
from diffaccel.adapters.unet import UNetAdapter
from diffaccel.errors import DiffaccelError

ADAPTERS: tuple[Adapter, ...] = (DiTAdapter(), PixArtAdapter(), SD3Adapter(), FluxAdapter(), UNetAdapter())


class UnsupportedModelError(DiffaccelError):
    pass


def supported_classes() -> list[str]:
    return [cls for adapter in ADAPTERS for cls in adapter.model_classes]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for a model, by its class (or a base class) name."""
    names = [cls.__name__ for cls in type(model).__mro__]
    for adapter in ADAPTERS:
        if any(name in adapter.model_classes for name in names):
            return adapter
    raise UnsupportedModelError(
        f"diffaccel has no adapter for {type(model).__name__}; supported: {', '.join(supported_classes())}. "
        "To add one, subclass diffaccel.adapters.base.Adapter (list the modules to cache in `units`) "
        "and append an instance to diffaccel.adapters.ADAPTERS.")


def adapter_by_name(name: str) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise UnsupportedModelError(f"unknown adapter {name!r}; known: {', '.join(a.name for a in ADAPTERS)}")


__all__ = ["ADAPTERS", "Adapter", "Unit", "UnsupportedModelError", "adapter_by_name", "adapter_for",
           "supported_classes"]
