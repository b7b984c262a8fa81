"""The platforms' route templates: one file per kind of upstream, read once, on first use.

Owns where the tables are and loading them; matching a path against them is proxy/routing.py's. feishu.txt and
dingtalk_api.txt are written from the official SDKs by `python -m proxy.platforms.routes.extract`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from proxy.routing import RouteShapes


@cache
def shapes(name: str) -> RouteShapes:
    """`feishu`, `dingtalk_api` or `dingtalk_oapi`."""
    return RouteShapes.parse(files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8"))


__all__ = ["shapes"]
