"""Writes feishu.txt and dingtalk_api.txt, the platforms' route templates, from the official SDKs' own sources.

Run `python -m proxy.platforms.routes.extract` with the test extras installed (lark-oapi, alibabacloud-dingtalk) to
take up the APIs a newer SDK release adds. It reads the SDKs' source text only (every request builder names its
path); nothing is imported from them. dingtalk_oapi.txt has no SDK to come from and is kept by hand.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
# lark-oapi: `.uri("/open-apis/im/v1/messages/:message_id")`; a few builders format a query in: those are skipped.
FEISHU = re.compile(r'"(/open-apis/[^"{}?]+)"')
# alibabacloud-dingtalk: `pathname=f'/v1.0/contact/users/{union_id}'`.
DINGTALK_API = re.compile(r"pathname=f?'(/v\d\.\d/[^']+)'")
BRACED = re.compile(r"\{(\w+)\}")


def sources(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        sys.exit(f"{package} is not installed: pip install -e '.[test]'")
    return sorted(Path(spec.origin).parent.rglob("*.py"))


def feishu_templates() -> set[str]:
    return {m for path in sources("lark_oapi") for m in FEISHU.findall(path.read_text(encoding="utf-8"))}


def dingtalk_api_templates() -> set[str]:
    found = {m for path in sources("alibabacloud_dingtalk")
             for m in DINGTALK_API.findall(path.read_text(encoding="utf-8"))}
    return {BRACED.sub(r":\1", template) for template in found}


def render(templates: set[str], sdk: str) -> str:
    header = f"# Route templates of {sdk} {version(sdk)}, written by proxy/platforms/routes/extract.py. Do not edit.\n"
    return header + "".join(f"{t}\n" for t in sorted(templates))


def main() -> None:
    for name, templates, sdk in (("feishu.txt", feishu_templates(), "lark-oapi"),
                                 ("dingtalk_api.txt", dingtalk_api_templates(), "alibabacloud-dingtalk")):
        (HERE / name).write_text(render(templates, sdk))
        print(f"wrote {name}: {len(templates)} templates")


if __name__ == "__main__":
    main()
