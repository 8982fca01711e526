"""Ray is an optional dependency: one place says how to get it."""

from __future__ import annotations

from types import ModuleType

__all__ = ["RayNotInstalled", "require_ray"]


class RayNotInstalled(RuntimeError):
    """`--ray` was asked for and Ray Serve cannot be imported."""


def require_ray() -> tuple[ModuleType, ModuleType]:
    """`(ray, ray.serve)`, or `RayNotInstalled` naming the install command."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RayNotInstalled(f"serving on Ray needs Ray Serve, which is not installed ({e}); install it with "
                              "pip install 'ditserve[ray]' (Ray 2.60)") from None
    return ray, serve
