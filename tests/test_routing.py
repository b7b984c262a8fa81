"""Routing: longest prefix on a segment boundary; route templates from each platform's own route shapes, so that no
ID (a user id like zhangsan, oc_/ou_/om_/on_ ids, app tokens, table ids, numbers) ever becomes a label value."""

from __future__ import annotations

import random
import string

import pytest

from proxy.config import Address
from proxy.platforms.routes import shapes
from proxy.routing import OTHER_ROUTE, RouteLabels, Router, RouteShapes

A = Address("127.0.0.1", 8080)
UPSTREAM_TABLES = {"open": "feishu", "api": "dingtalk_api", "oapi": "dingtalk_oapi"}


def test_longest_prefix_on_segment_boundary() -> None:
    router: Router[str] = Router()
    router.add(A, "/ding", "oapi")
    router.add(A, "/ding/api", "api")
    assert router.resolve(A, "/ding/api/v1.0/x").target == "api"       # type: ignore[union-attr]
    assert router.resolve(A, "/ding/topapi/x").path == "/topapi/x"     # type: ignore[union-attr]
    assert router.resolve(A, "/dingx/y") is None
    assert router.resolve(Address("127.0.0.1", 1), "/ding/x") is None


def test_whole_port_binding_keeps_the_path() -> None:
    router: Router[str] = Router()
    router.add(A, "", "api")
    assert router.resolve(A, "/v1.0/contact/users/me").path == "/v1.0/contact/users/me"   # type: ignore[union-attr]


# Paths as the platforms' documentation and code that calls them write them (sample IDs in the docs' own shapes:
# open.feishu.cn request examples, open.dingtalk.com server API pages, SDK callers found with the search tool).
CORPUS = [
    ("open", "/open-apis/contact/v3/users/zhangsan", "/open-apis/contact/v3/users/:user_id"),
    ("open", "/open-apis/contact/v3/users/ou_7d8a6e6df7621552ce5d2f3c4d7e2e4d", "/open-apis/contact/v3/users/:user_id"),
    ("open", "/open-apis/contact/v3/users/on_94a1ee5551019f18cd73d9f111898cf2", "/open-apis/contact/v3/users/:user_id"),
    ("open", "/open-apis/contact/v3/users/batch_get_id", "/open-apis/contact/v3/users/batch_get_id"),
    ("open", "/open-apis/contact/v3/departments/od-4e6ac4d14bcd5071a37a39de902c7141/children",
     "/open-apis/contact/v3/departments/:department_id/children"),
    ("open", "/open-apis/im/v1/chats/oc_abcdefghij", "/open-apis/im/v1/chats/:chat_id"),
    ("open", "/open-apis/im/v1/chats/oc_a0553eda9014c201e6969b478895c230/members",
     "/open-apis/im/v1/chats/:chat_id/members"),
    ("open", "/open-apis/im/v1/chats/oc_a0553eda9014c201e6969b478895c230/members/me_join",
     "/open-apis/im/v1/chats/:chat_id/members/me_join"),
    ("open", "/open-apis/im/v1/messages", "/open-apis/im/v1/messages"),
    ("open", "/open-apis/im/v1/messages/om_dc13264520392913993dd051dba21dcf/reply",
     "/open-apis/im/v1/messages/:message_id/reply"),
    ("open", "/open-apis/im/v1/messages/om_dc13264520392913993dd051dba21dcf/resources/file_v2_9e2f1a3b-7c4d",
     "/open-apis/im/v1/messages/:message_id/resources/:file_key"),
    ("open", "/open-apis/im/v1/images/img_v2_041b28e3-5680-48c2-9af2-497ace79333g", "/open-apis/im/v1/images/:image_key"),
    ("open", "/open-apis/bitable/v1/apps/bascnCMII2ORej2RItqpZZUNMIe/tables/tblsRc9GRRXKqhvW/records/batch_create",
     "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create"),
    ("open", "/open-apis/bitable/v1/apps/bascnCMII2ORej2RItqpZZUNMIe/tables/tblsRc9GRRXKqhvW/records/recpCsf4ME",
     "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/:record_id"),
    ("open", "/open-apis/bitable/v1/apps/bascnCMII2ORej2RItqpZZUNMIe/tables/tblsRc9GRRXKqhvW/views/vewTpR1urY",
     "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/views/:view_id"),
    ("open", "/open-apis/docx/v1/documents/doxcnePuYufKa49ISjhD8Ih0ikh/blocks/doxcnO6UW6wAw2qIcYf4hZpFIth/children",
     "/open-apis/docx/v1/documents/:document_id/blocks/:block_id/children"),
    ("open", "/open-apis/calendar/v4/calendars/feishu.cn_HF9U2MbibE8PPpjro6xjqa@group.calendar.feishu.cn/events",
     "/open-apis/calendar/v4/calendars/:calendar_id/events"),
    ("open", "/open-apis/calendar/v4/calendars/primary", "/open-apis/calendar/v4/calendars/primary"),
    ("open", "/open-apis/task/v2/tasks/d300a75f-c56a-4be9-80d1-e47653028ceb", "/open-apis/task/v2/tasks/:task_guid"),
    ("open", "/open-apis/drive/v1/files/boxcnrHpsg1QDqXAAAyachabcef/download", "/open-apis/drive/v1/files/:file_token/download"),
    ("open", "/open-apis/application/v6/applications/cli_9b445f5258795107", "/open-apis/application/v6/applications/:app_id"),
    ("open", "/open-apis/auth/v3/tenant_access_token/internal", "/open-apis/auth/v3/tenant_access_token/internal"),
    ("open", "/open-apis/sheets/v2/spreadsheets/shtcngNygNfuqhxTBf588jwgWbJ/values/Sheet1!A1:B2",
     "/open-apis/sheets/v2/spreadsheets/:id/:id/:id"),   # not in lark-oapi (sheets v2): only the platform's words kept
    ("open", "/open-apis/newservice/v1/things/zhangsan", "/open-apis/:id/v1/:id/:id"),   # an API newer than the table
    ("api", "/v1.0/contact/users/zhangsan", "/v1.0/contact/users/:union_id"),
    ("api", "/v1.0/contact/users/me", "/v1.0/contact/users/:union_id"),   # `me`: the user token's owner, by the docs
    ("api", "/v1.0/contact/users/Zi2sT7RVDq2zLg3iiiE", "/v1.0/contact/users/:union_id"),
    ("api", "/v1.0/robot/oToMessages/batchSend", "/v1.0/robot/oToMessages/batchSend"),
    ("api", "/v1.0/oauth2/accessToken", "/v1.0/oauth2/accessToken"),
    ("api", "/v1.0/oauth2/ding9f50b15bccd16741/token", "/v1.0/oauth2/:corp_id/token"),
    ("api", "/v1.0/todo/users/MhC5jXZMkKwoVvxt9srSkwiEiE/tasks/taskZ8a1", "/v1.0/todo/users/:union_id/tasks/:task_id"),
    ("api", "/v1.0/storage/spaces/21557423/dentries/138871/downloadInfos/query",
     "/v1.0/storage/spaces/:space_id/dentries/:dentry_id/downloadInfos/query"),
    ("api", "/v1.0/calendar/users/union-1/calendars/primary/events/ZHRhMjJxQ1R4WjVCVmc9PQ",
     "/v1.0/calendar/users/:user_id/calendars/:calendar_id/events/:event_id"),
    ("api", "/v1.0/notable/bases/r1R7q3QmWew5lo02fxB7nXkmJxkz0dnN/sheets/Sheet1/records",
     "/v1.0/notable/bases/:base_id/sheets/:sheet_id_or_name/records"),
    ("api", "/v1.0/gateway/connections/open", "/v1.0/gateway/connections/open"),
    ("oapi", "/topapi/v2/user/get", "/topapi/v2/user/get"),
    ("oapi", "/topapi/message/corpconversation/asyncsend_v2", "/topapi/message/corpconversation/asyncsend_v2"),
    ("oapi", "/topapi/processinstance/get", "/topapi/processinstance/get"),
    ("oapi", "/gettoken", "/gettoken"),
    ("oapi", "/user/getUseridByUnionid", "/user/getUseridByUnionid"),
    ("oapi", "/topapi/v2/user/zhangsan", "/topapi/v2/user/:id"),   # oapi paths carry no IDs; a made-up one keeps none
    ("oapi", "/user/get/manager4220", "/user/get/:id"),
]


@pytest.mark.parametrize("upstream, path, template", CORPUS)
def test_a_realistic_path_gets_its_template(upstream: str, path: str, template: str) -> None:
    assert shapes(UPSTREAM_TABLES[upstream]).template(path) == template


@pytest.mark.parametrize("upstream, path, template", CORPUS)
def test_no_id_of_the_corpus_reaches_the_label(upstream: str, path: str, template: str) -> None:
    label = shapes(UPSTREAM_TABLES[upstream]).template(path)
    words = set(path.split("/")) - set(label.split("/"))
    assert not any(word and word in label for word in words), label


def ids(rng: random.Random) -> list[str]:
    """IDs in the shapes the platforms hand out, a lower-case user name first (it looks like a verb)."""
    def mixed(n: int) -> str:
        return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))
    return ["zhangsan", "lisi01", str(rng.randrange(10**6, 10**12)), f"oc_{mixed(32).lower()}", f"ou_{mixed(32)}",
            f"om_{mixed(32)}", f"on_{mixed(32)}", f"bascn{mixed(22)}", f"tbl{mixed(13)}", mixed(26)]


@pytest.mark.parametrize("table", sorted(UPSTREAM_TABLES.values()))
def test_every_template_with_ids_in_its_params_labels_without_them(table: str) -> None:
    """Each of the thousands of templates, its `:params` filled with IDs of every shape: no ID is in the label."""
    rng = random.Random(15)
    routes = shapes(table)
    for template in routes.templates():
        for value in ids(rng):
            path = "/".join(value if s.startswith(":") else s for s in template.split("/"))
            label = routes.template(path)
            assert value not in label.split("/"), (template, path, label)
            assert label.count("/") == template.count("/"), (template, label)


def test_tables_hold_what_the_sdks_name() -> None:
    from proxy.platforms.feishu import IDEMPOTENCY
    feishu = set(shapes("feishu").templates())
    assert len(feishu) > 1000 and len(set(shapes("dingtalk_api").templates())) > 2000
    assert set(IDEMPOTENCY) <= feishu   # the routes that take an idempotency key are matched by their own name


def test_a_path_no_template_matches_keeps_only_the_platforms_words() -> None:
    routes = RouteShapes(["/v1/users/:user_id", "/v1/users/search"])
    assert routes.template("/v1/users/zhangsan") == "/v1/users/:user_id"
    assert routes.template("/v1/users/search") == "/v1/users/search"
    assert routes.template("/v1/users/zhangsan/extra") == "/v1/users/:id/:id"
    assert routes.template("/v1/users/") == "/v1/users/"


def test_labels_are_capped_per_app() -> None:
    labels = RouteLabels(limit=3)
    seen = {labels.label(f"/open-apis/x{i}/y") for i in range(100)}
    assert len(seen) == 4 and OTHER_ROUTE in seen


def test_a_thousand_prefixes_resolve_like_the_longest_match() -> None:
    router: Router[str] = Router()
    for i in range(1000):
        router.add(A, f"/app-{i}", f"app-{i}")
    router.add(A, "/app-1/nested", "nested")
    assert router.resolve(A, "/app-999/open-apis/x").target == "app-999"   # type: ignore[union-attr]
    assert router.resolve(A, "/app-1/nested/x").path == "/x"               # type: ignore[union-attr]
    assert router.resolve(A, "/app-1/nestedx").target == "app-1"           # type: ignore[union-attr]
    assert router.resolve(A, "/app-10").path == "/"                        # type: ignore[union-attr]
    assert router.resolve(A, "/app-1000/x") is None
    assert router.resolve(A, "/app-") is None
    assert router.prefixes(A)[0] == "/app-1/nested" and len(router.targets(A)) == 1001
