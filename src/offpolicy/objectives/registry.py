"""Flat name -> function registries, filled by decorators where each function is defined."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(dict):
    """A plain dict whose failed lookups list the valid names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __missing__(self, name: str) -> Any:
        valid = ", ".join(sorted(self)) or "(none registered)"
        raise KeyError(f"unknown {self.kind} {name!r}; valid names: {valid}")

    def register(self, name: str, **attrs: Any) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name`` and attach ``attrs`` (e.g. ``needs``) to it."""

        def deco(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            for key, value in attrs.items():
                setattr(fn, key, value)
            fn.registry_name = name  # type: ignore[attr-defined]
            self[name] = fn
            return fn

        return deco
