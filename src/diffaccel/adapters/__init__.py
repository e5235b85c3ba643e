"""Adapters: one file per architecture, and the registry that picks one for a model.

To support a new architecture, write an ``Adapter`` subclass (see ``base.py``) whose ``units``
lists the modules worth caching, and register it (``adapters.register``; docs/adapters.md).
"""

from diffaccel.adapters.base import Adapter, Unit
from diffaccel.adapters.registry import (
    ADAPTERS,
    adapter_by_name,
    adapter_for,
    denoiser_name,
    find_adapter,
    find_adapter_by_class,
    find_denoiser,
    register,
    supported_classes,
)
from diffaccel.errors import UnsupportedModelError

__all__ = ["ADAPTERS", "Adapter", "Unit", "UnsupportedModelError", "adapter_by_name", "adapter_for",
           "denoiser_name", "find_adapter", "find_adapter_by_class", "find_denoiser", "register", "supported_classes"]
