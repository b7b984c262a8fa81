"""Routing: longest prefix on a segment boundary; route templates that keep label values bounded."""

from __future__ import annotations

from proxy.config import Address
from proxy.routing import OTHER_ROUTE, RouteLabels, Router, route_template

A = Address("127.0.0.1", 8080)


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


def test_route_templates_replace_ids() -> None:
    assert route_template("/open-apis/bitable/v1/apps/bascnCMII2ORej2RItqpZZUNMIe/tables/tblsRc9GRRXKqhvW/records/batch_create") == \
        "/open-apis/bitable/v1/apps/:app_token/tables/:table_id/records/batch_create"
    assert route_template("/open-apis/im/v1/messages/om_dc13264520392913993dd051dba21dcf/reply") == \
        "/open-apis/im/v1/messages/:message_id/reply"
    assert route_template("/v1.0/robot/oToMessages/batchSend") == "/v1.0/robot/oToMessages/batchSend"
    assert route_template("/topapi/v2/user/get") == "/topapi/v2/user/get"
    assert route_template("/topapi/message/corpconversation/asyncsend_v2") == "/topapi/message/corpconversation/asyncsend_v2"
    assert route_template("/v1.0/contact/users/manager001") == "/v1.0/contact/users/:user_id"
    assert route_template("/v1.0/contact/users/me") == "/v1.0/contact/users/me"


def test_labels_are_capped_per_app() -> None:
    labels = RouteLabels(limit=3)
    seen = {labels.label(route_template(f"/open-apis/x{i}/y")) for i in range(100)}
    assert len(seen) == 4 and OTHER_ROUTE in seen
