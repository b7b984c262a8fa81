import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.fakes.robots import FakeDingTalkRobot, FakeFeishuRobot
from proxy.robots.handlers import RobotService, add_robot_routes, dispatch
from proxy.robots.limiter import DINGTALK
from proxy.robots.settings import RobotsSettings, RobotTarget
from proxy.secret import Secret
from tests.robots_support import drive, markdown
from tests.test_robots_render import alert, payload


@pytest.fixture
def clock():
    return VirtualClock(start=1_800_000_600.0)


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
async def fakes(aiohttp_server, clock):
    dingtalk = FakeDingTalkRobot(clock, token="tok", secret="SECdt", keyword="alert")
    feishu = FakeFeishuRobot(clock, token="hook", secret="fs", keyword="oncall")
    dt_server, fs_server = await aiohttp_server(dingtalk.app()), await aiohttp_server(feishu.app())
    targets = {
        "ops": RobotTarget("ops", "dingtalk", Secret(str(dt_server.make_url("/robot/send?access_token=tok"))),
                           Secret("SECdt"), keyword="alert"),
        "dev": RobotTarget("dev", "feishu", Secret(str(fs_server.make_url("/open-apis/bot/v2/hook/hook"))),
                           Secret("fs"), keyword="oncall"),
    }
    return dingtalk, feishu, targets


@pytest.fixture
async def service(fakes, clock, registry):
    async with aiohttp.ClientSession() as session:
        yield RobotService.create(RobotsSettings(fakes[2], deadline=10.0), session, clock, registry, rand=lambda: 0.5)


@pytest.fixture
async def client(aiohttp_client, service):
    app = web.Application()
    add_robot_routes(app, service)
    return await aiohttp_client(app)


async def post(clock, client, path, **kw):
    response = await drive(clock, client.post(path, **kw))
    return response.status, await response.json(), response.headers


async def test_a_native_dingtalk_message_is_signed_keyworded_and_answered_in_dingtalk_shape(client, fakes, clock):
    status, body, _ = await post(clock, client, "/robots/ops", json=markdown("disk full"))
    assert (status, body) == (200, {"errcode": 0, "errmsg": "ok"})
    sent = fakes[0].log.accepted[0]
    assert sent.body["markdown"]["text"].endswith("alert") and "sign" in sent.query


async def test_a_native_feishu_message_is_answered_in_feishu_shape(client, fakes, clock):
    status, body, _ = await post(clock, client, "/robots/dev", json={"msg_type": "text", "content": {"text": "hi"}})
    assert (status, body) == (200, {"code": 0, "msg": "success"})
    assert len(fakes[1].log.accepted) == 1


async def test_an_unknown_target_is_404_and_readable_by_either_sdk(client, clock):
    status, body, _ = await post(clock, client, "/alerts/nope", json=payload(alert()))
    assert status == 404
    assert body["code"] == body["errcode"] == 990404 and "nope" in body["msg"]


@pytest.mark.parametrize("path, data", [("/robots/ops", b"{not json"), ("/robots/ops", b'{"text": "no msgtype"}'),
                                        ("/robots/dev", b'{"msgtype": "text"}'), ("/alerts/ops", b'{"alerts": []}')])
async def test_malformed_bodies_are_400_and_never_sent(client, fakes, clock, registry, path, data):
    status, body, _ = await post(clock, client, path, data=data)
    assert status == 400
    assert (body.get("errcode") or body.get("code")) == 990400
    assert fakes[0].log.accepted == [] and fakes[1].log.accepted == []


async def test_an_alert_is_delivered_and_answered_200(client, fakes, clock, registry):
    status, _, _ = await post(clock, client, "/alerts/dev", json=payload(alert()))
    assert status == 200
    assert fakes[1].log.accepted[0].body["card"]["header"]["template"] == "red"
    assert registry.get_sample_value("imsidecar_robot_messages_total", {"target": "dev", "result": "delivered"}) == 1


async def test_a_permanent_refusal_is_4xx_with_the_platform_code_and_cause(client, fakes, clock):
    fakes[0].log.answer_next((200, {"errcode": 400102, "errmsg": "robot 不存在或已停用"}))
    status, body, _ = await post(clock, client, "/alerts/ops", json=payload(alert()))
    assert status == 410
    assert body["errcode"] == 400102 and "disabled" in body["errmsg"]


async def test_a_transient_failure_is_503_with_retry_after_so_alertmanager_retries(client, fakes, clock):
    fakes[0].log.answer_next(*[(502, {})] * 20)
    status, body, headers = await post(clock, client, "/alerts/ops", json=payload(alert()))
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["errcode"] == 990503


async def test_rate_limited_is_429_for_applications_and_503_for_alertmanager(client, fakes, clock):
    for i in range(DINGTALK.windows[0].limit):
        assert (await post(clock, client, "/robots/ops", json=markdown(f"m{i}")))[0] == 200
    status, body, headers = await post(clock, client, "/robots/ops", json=markdown("one more"))
    assert status == 429 and body["errcode"] == 990429 and int(headers["Retry-After"]) >= 50
    status, _, headers = await post(clock, client, "/alerts/ops", json=payload(alert()))
    assert status == 503 and int(headers["Retry-After"]) >= 50
    assert fakes[0].log.refused == []  # the platform never saw a 21st message


async def test_an_oversized_native_message_is_413(client, fakes, clock):
    status, body, _ = await post(clock, client, "/robots/ops", json=markdown("alert " + "x" * 21000))
    assert status == 413 and body["errcode"] == 990413


@pytest.mark.parametrize("message", [{"msg_type": "text", "content": {"text": "deploy done"}},
                                     {"msg_type": "interactive", "card": {"elements": []}}])
async def test_the_feishu_keyword_is_added_where_the_message_lacks_it(client, fakes, clock, message):
    status, _, _ = await post(clock, client, "/robots/dev", json=message)
    assert status == 200 and fakes[1].log.refused == []
    assert "oncall" in str(fakes[1].log.accepted[0].body)


async def test_dispatch_serves_our_paths_on_a_low_level_server_and_passes_the_rest_on(
        aiohttp_raw_server, aiohttp_client, service, fakes, clock):
    async def sidecar(request):
        return await dispatch(service, request) or web.Response(status=299, text="pipeline")

    client = await aiohttp_client(await aiohttp_raw_server(sidecar))
    assert (await post(clock, client, "/alerts/dev", json=payload(alert())))[0] == 200
    assert (await drive(clock, client.get("/alerts/dev"))).status == 405
    assert (await drive(clock, client.post("/open-apis/im/v1/messages", json={}))).status == 299
    assert len(fakes[1].log.accepted) == 1


async def test_alertmanager_resending_a_failed_notification_counts_its_failure_once(client, fakes, clock, registry):
    """Alertmanager retries a 5xx and sends the notification again each group_interval: three tries, two failing,
    are one notification that failed and was then recovered, not three messages with two failures."""
    fakes[0].log.answer_next(*[(502, {})] * 10)   # the first two tries use up five attempts each
    notification = payload(alert())
    assert (await post(clock, client, "/alerts/ops", json=notification))[0] == 503
    assert (await post(clock, client, "/alerts/ops", json=notification))[0] == 503
    assert (await post(clock, client, "/alerts/ops", json=notification))[0] == 200
    assert (await post(clock, client, "/alerts/ops", json=payload(alert("Other"))))[0] == 200

    def value(name: str, result: str) -> float | None:
        return registry.get_sample_value(name, {"target": "ops", "result": result})
    assert value("imsidecar_robot_messages_total", "unavailable") == 1
    assert value("imsidecar_robot_messages_total", "delivered") == 1   # the other notification
    assert value("imsidecar_robot_resends_total", "unavailable") == 1
    assert value("imsidecar_robot_resends_total", "delivered") == 1
    assert value("imsidecar_robot_messages_total", "refused") == 0     # every result's series exists at zero
