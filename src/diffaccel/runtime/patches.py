"""The attributes an executor sets on the user's objects while a plan is applied, and how they are
undone: newest first, each put back as it was, except one that another library or the user has
replaced since (accelerate's offload hook wraps ``forward`` over ours; a user sets another
``pipe.scheduler``). That one is left as it is, so their wrapper keeps working: ours under it passes
every call straight through once the plan is removed (the ``Guard``'s ``live`` flag)."""

from __future__ import annotations

from typing import Any

from diffaccel.errors import PlanError, PlanWarning, warn

_ABSENT = object()

Saved = tuple[Any, str, Any, bool, Any]  # object, name, earlier value, whether it had one, ours


class Patches:
    """Mixin of the executor: ``patch`` sets an attribute until ``undo_patches``."""

    _saved: list[Saved]

    def __deepcopy__(self, memo: dict) -> Any:
        """A deep copy of a patched model or pipeline (which holds its executor) would keep wrappers that
        run the original's model and scheduler."""
        raise PlanError("a model or pipeline with a plan applied cannot be deep-copied (the copy's wrappers would run "
                        "the original's model and scheduler): copy it before applying the plan or after removing it")

    def patch(self, obj: Any, name: str, replacement: Any) -> None:
        """Set ``obj.name`` until ``remove()``, which undoes the patches newest first (features patch too)."""
        had = name in vars(obj)
        self._saved.append((obj, name, vars(obj).get(name), had, replacement))
        setattr(obj, name, replacement)

    def undo_patches(self) -> None:
        """Put back what ``patch`` replaced, newest first, but for what was replaced since."""
        while self._saved:
            obj, name, value, had, ours = self._saved.pop()
            now = getattr(obj, name, _ABSENT)
            if now is not ours:
                _kept(obj, name, value, now)
            elif had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def _kept(obj: Any, name: str, value: Any, now: Any) -> None:
    """A patched attribute someone replaced while the plan was applied stays theirs; a replaced
    ``pipe.scheduler`` (a solver plan's) is said, as the pipeline's own is not put back."""
    if name == "scheduler" and now is not _ABSENT:
        warn(PlanWarning(f"pipe.scheduler was replaced while a plan with a solver section was applied: your "
                         f"{type(now).__name__} was kept and the pipeline's own {type(value).__name__} was not put "
                         "back; set pipe.scheduler after removing the plan (or before applying it)"))
