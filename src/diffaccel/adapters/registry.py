"""Which adapter fits a model, and where a pipeline keeps its denoiser."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.adapters.base import Adapter
from diffaccel.adapters.dit import DiTAdapter
from diffaccel.adapters.flux import FluxAdapter
from diffaccel.adapters.pixart import PixArtAdapter
from diffaccel.adapters.sd3 import SD3Adapter
from diffaccel.adapters.unet import UNetAdapter
from diffaccel.errors import UnsupportedModelError

ADAPTERS: tuple[Adapter, ...] = (DiTAdapter(), PixArtAdapter(), SD3Adapter(), FluxAdapter(), UNetAdapter())
DENOISER_NAMES = ("transformer", "unet")  # where diffusers pipelines keep the denoiser


def register(adapter: Adapter) -> None:
    """Add an adapter for another architecture (it is tried before the built-in ones)."""
    global ADAPTERS
    ADAPTERS = (adapter, *ADAPTERS)


def supported_classes() -> list[str]:
    return [cls for adapter in ADAPTERS for cls in adapter.model_classes]


def find_adapter(model: torch.nn.Module) -> Adapter | None:
    for cls in type(model).__mro__:
        adapter = find_adapter_by_class(cls.__name__)
        if adapter is not None:
            return adapter
    return None


def find_adapter_by_class(class_name: str) -> Adapter | None:
    """The adapter for a model class name (as a pipeline's model_index.json names it)."""
    return next((adapter for adapter in ADAPTERS if class_name in adapter.model_classes), None)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for a model, by its class (or a base class) name."""
    adapter = find_adapter(model)
    if adapter is None and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        raise UnsupportedModelError(
            f"this {type(model._orig_mod).__name__} is compiled (torch.compile wraps it in an OptimizedModule, whose "
            "forward diffaccel cannot reach): apply the plan to the uncompiled model (model._orig_mod, or the "
            "pipeline before compiling its denoiser)")
    if adapter is None:
        raise UnsupportedModelError(
            f"diffaccel has no adapter for {type(model).__name__}; supported: {', '.join(supported_classes())}. "
            "To add one, subclass diffaccel.adapters.base.Adapter (list the modules to cache in `units`) "
            "and register it with diffaccel.adapters.register (see docs/adapters.md).")
    return adapter


def adapter_by_name(name: str) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise UnsupportedModelError(f"unknown adapter {name!r}; known: {', '.join(a.name for a in ADAPTERS)}")


def _modules(target: Any) -> dict[str, torch.nn.Module]:
    components = getattr(target, "components", None)
    source = components if isinstance(components, dict) else vars(target)
    return {name: value for name, value in source.items() if isinstance(value, torch.nn.Module)}


def denoiser_name(target: Any, attribute: str | None = None) -> str:
    """The attribute under which pipeline ``target`` keeps its denoiser: ``attribute`` if given,
    else ``transformer`` / ``unet``, else the one component an adapter supports."""
    modules = _modules(target)
    if attribute is not None:
        if attribute not in modules:
            raise UnsupportedModelError(f"{type(target).__name__} has no model component {attribute!r}; "
                                        f"its model components: {', '.join(modules) or 'none'}")
        return attribute
    for name in DENOISER_NAMES:
        if name in modules:
            twins = [other for other, module in modules.items() if type(module) is type(modules[name])]
            if len(twins) > 1:  # Wan 2.2: transformer for the noisy steps, transformer_2 for the rest
                raise UnsupportedModelError(f"{type(target).__name__} has several denoisers of one class "
                                            f"({', '.join(twins)}): a plan runs on one, the others unaccelerated and "
                                            "uncounted; name it with denoiser='...' to accept that")
            return name
    supported = [name for name, module in modules.items() if find_adapter(module) is not None]
    if len(supported) == 1:
        return supported[0]
    if supported:
        raise UnsupportedModelError(f"{type(target).__name__} has several denoisers diffaccel supports "
                                    f"({', '.join(supported)}): name one with denoiser='...'")
    classes = ", ".join(f"{name} ({type(m).__name__})" for name, m in modules.items()) or "none"
    raise UnsupportedModelError(f"found no denoiser in {type(target).__name__}: its model components are "
                                f"{classes}; diffaccel supports {', '.join(supported_classes())}")


def find_denoiser(target: Any, attribute: str | None = None) -> tuple[torch.nn.Module, Any]:
    """``(denoiser, scheduler)`` of a pipeline (scheduler None for a bare model)."""
    if isinstance(target, torch.nn.Module):
        return target, None
    model = _modules(target)[denoiser_name(target, attribute)]
    return model, getattr(target, "scheduler", None)
