"""Platform specifics, one module per platform; this index maps a config's `platform` to its rules.

Owns the lookup only.
"""

from __future__ import annotations

from proxy.config import AppConfig
from proxy.platforms.base import Platform
from proxy.platforms.dingtalk import DingTalk
from proxy.platforms.feishu import Feishu

_PLATFORMS: dict[str, type[Platform]] = {"feishu": Feishu, "lark": Feishu, "dingtalk": DingTalk}


def platform_for(app: AppConfig) -> Platform:
    return _PLATFORMS[app.platform](app)


__all__ = ["Platform", "platform_for"]
