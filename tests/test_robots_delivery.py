import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import VirtualClock
from proxy.fakes.robots import DROP, FakeDingTalkRobot, FakeFeishuRobot
from proxy.robots.delivery import Delivery
from proxy.robots.errors import RateLimited, Refused, TooLarge, Unavailable
from proxy.robots.limiter import Limiters
from proxy.robots.metrics import RobotMetrics
from proxy.robots.settings import RobotTarget
from proxy.secret import Secret
from tests.robots_support import card, drive, markdown

DT_SECRET = "SECdingtalk-secret"
FS_SECRET = "feishu-secret"


@pytest.fixture
def clock():
    return VirtualClock(start=1_800_000_600.0)  # ten minutes clear of a :00/:30 mark


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def delivery(session, clock, registry):
    return Delivery(session, clock, Limiters(clock, rand=lambda: 0.5), RobotMetrics(registry), rand=lambda: 0.5)


@pytest.fixture
async def dingtalk(aiohttp_server, clock):
    fake = FakeDingTalkRobot(clock, token="tok", secret=DT_SECRET, keyword="alert")
    server = await aiohttp_server(fake.app())
    fake.target = RobotTarget("ops", "dingtalk", Secret(str(server.make_url("/robot/send?access_token=tok"))),
                              Secret(DT_SECRET))
    return fake


@pytest.fixture
async def feishu(aiohttp_server, clock):
    fake = FakeFeishuRobot(clock, token="hook", secret=FS_SECRET)
    server = await aiohttp_server(fake.app())
    fake.target = RobotTarget("dev", "feishu", Secret(str(server.make_url("/open-apis/bot/v2/hook/hook"))),
                              Secret(FS_SECRET))
    return fake


async def test_a_signed_message_reaches_dingtalk_once(delivery, dingtalk, clock, registry):
    receipt = await drive(clock, delivery.send(dingtalk.target, markdown("alert: disk full"), deadline=30))
    assert receipt.attempts == 1
    assert [r.body for r in dingtalk.log.accepted] == [markdown("alert: disk full")]
    assert set(dingtalk.log.accepted[0].query) == {"access_token", "timestamp", "sign"}
    assert registry.get_sample_value("imsidecar_robot_messages_total", {"target": "ops", "result": "delivered"}) == 1


async def test_busy_and_server_errors_are_retried_until_delivered(delivery, dingtalk, clock, registry):
    dingtalk.log.answer_next((200, {"errcode": -1, "errmsg": "系统繁忙"}), (502, {}), DROP)
    receipt = await drive(clock, delivery.send(dingtalk.target, markdown("alert: x"), deadline=30))
    assert receipt.attempts == 4
    assert len(dingtalk.log.accepted) == 1
    assert registry.get_sample_value("imsidecar_robot_retries_total", {"target": "ops", "reason": "errcode_-1"}) == 1
    assert registry.get_sample_value("imsidecar_robot_retries_total", {"target": "ops", "reason": "http_502"}) == 1


async def test_a_wrong_secret_is_refused_once_naming_the_cause_and_never_showing_the_secret(
        delivery, dingtalk, clock):
    wrong = RobotTarget("ops", "dingtalk", dingtalk.target.webhook, Secret("SECwrong-one"))
    with pytest.raises(Refused) as caught:
        await drive(clock, delivery.send(wrong, markdown("alert: x"), deadline=30))
    assert caught.value.code == 310000 and caught.value.status == 403
    assert "signature" in caught.value.message and "sign not match" in caught.value.message
    assert "SECwrong-one" not in caught.value.message and "tok" not in caught.value.message.split("[")[0]
    assert dingtalk.log.refused == [(310000, "sign not match")]  # not retried


async def test_a_missing_keyword_is_refused_without_retry(delivery, dingtalk, clock):
    with pytest.raises(Refused) as caught:
        await drive(clock, delivery.send(dingtalk.target, markdown("disk full"), deadline=30))
    assert "keywords not in content" in caught.value.message
    assert len(dingtalk.log.refused) == 1


@pytest.mark.parametrize("code, status, words", [(400102, 410, "disabled"), (400013, 410, "dissolved"),
                                                  (460101, 413, "20000-byte")])
async def test_dead_robots_and_oversized_messages_are_permanent(delivery, dingtalk, clock, code, status, words):
    dingtalk.log.answer_next((200, {"errcode": code, "errmsg": "x"}))
    with pytest.raises(Refused) as caught:
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=30))
    assert (caught.value.code, caught.value.status) == (code, status)
    assert words in caught.value.message
    assert dingtalk.log.script == type(dingtalk.log.script)() and dingtalk.log.accepted == []


async def test_an_oversized_message_is_refused_before_using_a_send_slot(delivery, dingtalk, clock):
    with pytest.raises(TooLarge):
        await drive(clock, delivery.send(dingtalk.target, markdown("alert " + "x" * 20000), deadline=30))
    assert dingtalk.log.refused == [] and dingtalk.log.accepted == []


async def test_the_limiter_keeps_dingtalk_from_ever_throttling_the_robot(delivery, dingtalk, clock, registry):
    for i in range(25):
        await drive(clock, delivery.send(dingtalk.target, markdown(f"alert {i}"), deadline=clock.now() + 120))
    assert len(dingtalk.log.accepted) == 25 and dingtalk.log.refused == []
    assert dingtalk.log.accepted[20].at >= 61.0
    waits = {"target": "ops", "outcome": "waited"}
    assert registry.get_sample_value("imsidecar_robot_ratelimit_waits_total", waits) == 1
    assert registry.get_sample_value("imsidecar_robot_ratelimit_wait_seconds_sum", {"target": "ops"}) >= 60.0


async def test_a_full_minute_fails_fast_with_the_time_to_wait(delivery, dingtalk, clock, registry):
    for i in range(20):
        await drive(clock, delivery.send(dingtalk.target, markdown(f"alert {i}"), deadline=30))
    with pytest.raises(RateLimited) as caught:
        await drive(clock, delivery.send(dingtalk.target, markdown("alert 21"), deadline=clock.now() + 30))
    assert caught.value.retry_after == pytest.approx(61.0, abs=0.1)
    assert len(dingtalk.log.accepted) == 20 and dingtalk.log.refused == []
    assert registry.get_sample_value("imsidecar_robot_messages_total",
                                     {"target": "ops", "result": "rate_limited"}) == 1
    assert registry.get_sample_value("imsidecar_robot_ratelimit_waits_total",
                                     {"target": "ops", "outcome": "rejected"}) == 1


async def test_a_robot_throttled_by_someone_else_is_held_for_the_penalty(delivery, dingtalk, clock):
    dingtalk.log.answer_next((200, {"errcode": 410100, "errmsg": "send too fast"}))
    with pytest.raises(RateLimited) as caught:
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=30))
    assert caught.value.retry_after == pytest.approx(600.0)
    with pytest.raises(RateLimited):  # every later send on that robot fails fast too, without a request
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=clock.now() + 30))
    assert dingtalk.log.accepted == [] and not dingtalk.log.script


async def test_a_retry_is_counted_only_when_it_is_sent(delivery, dingtalk, clock, registry):
    """After 410100 the robot is held for 10 minutes: the retry the loop decided on never goes out, so it is not
    counted; after the last of five 503s no retry follows either."""
    dingtalk.log.answer_next((200, {"errcode": 410100, "errmsg": "send too fast"}))
    with pytest.raises(RateLimited):
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=30))
    assert not registry.get_sample_value("imsidecar_robot_retries_total", {"target": "ops", "reason": "errcode_410100"})
    await clock.advance(601)   # the penalty is over
    dingtalk.log.answer_next(*[(503, {})] * 6)
    with pytest.raises(Unavailable):
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=clock.now() + 60))
    assert len(dingtalk.log.script) == 1   # five tries (max_attempts), one canned answer left
    assert registry.get_sample_value("imsidecar_robot_retries_total", {"target": "ops", "reason": "http_503"}) == 4


async def test_endless_server_errors_end_in_unavailable_within_the_deadline(delivery, dingtalk, clock):
    dingtalk.log.answer_next(*[(503, {})] * 10)
    with pytest.raises(Unavailable) as caught:
        await drive(clock, delivery.send(dingtalk.target, markdown("alert"), deadline=3))
    assert caught.value.retry_after is not None and clock.now() <= 3
    assert not isinstance(caught.value, RateLimited)


async def test_a_signed_card_reaches_feishu(delivery, feishu, clock):
    await drive(clock, delivery.send(feishu.target, card(), deadline=30))
    body = feishu.log.accepted[0].body
    assert body["msg_type"] == "interactive" and {"timestamp", "sign"} <= set(body)


async def test_feishu_too_many_requests_in_http_400_is_retried(delivery, feishu, clock):
    feishu.log.answer_next((400, {"code": 9499, "msg": "too many request", "data": {}}))
    receipt = await drive(clock, delivery.send(feishu.target, card(), deadline=30))
    assert receipt.attempts == 2 and len(feishu.log.accepted) == 1
    assert feishu.log.accepted[0].at >= 1.0  # waited out the throttle before trying again


@pytest.mark.parametrize("secret, keyword, code, words", [("wrong", None, 19021, "signature"),
                                                          (FS_SECRET, "needle", 19024, "keyword")])
async def test_feishu_sign_and_keyword_failures_are_permanent(delivery, feishu, clock, secret, keyword, code, words):
    feishu.keyword = keyword
    target = RobotTarget("dev", "feishu", feishu.target.webhook, Secret(secret))
    with pytest.raises(Refused) as caught:
        await drive(clock, delivery.send(target, card(), deadline=30))
    assert caught.value.code == code and words in caught.value.message
    assert len(feishu.log.refused) == 1


async def test_feishu_stays_under_5_per_second(delivery, feishu, clock):
    clock_start = clock.wall()
    for _ in range(12):
        await drive(clock, delivery.send(feishu.target, card(), deadline=clock.now() + 30))
    assert feishu.log.refused == [] and len(feishu.log.accepted) == 12
    assert clock.wall() - clock_start >= 2.0
