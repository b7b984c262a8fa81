"""What the retry loop counts as an attempt's time: from its sending, not from when it began to wait for a pooled
connection (that wait is the sidecar's own queue; counted, it would teach the monitor a slower platform)."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.clock import VirtualClock
from proxy.history import History
from proxy.metrics import Metrics
from proxy.outcome import Verdict
from proxy.retry import Attempt, RetryEngine
from proxy.upstream import Answer
from tests.saving_support import app_config, binding, body, exchange, json_answer


async def test_the_wait_for_a_pooled_connection_is_left_out_of_the_attempts_time() -> None:
    clock = VirtualClock()
    metrics = Metrics()
    observed: list[float] = []
    bound = binding(app_config())
    bound.observe = lambda verdict, latency: observed.append(latency)
    bound.breaker = SimpleNamespace(release_probe=lambda: None)
    request = exchange(bound, "GET", "/open-apis/im/v1/messages/om_1")

    async def send(exchange: object, body: object, attempt: Attempt) -> Answer:
        await clock.advance(0.5)              # 0.3 s queued for a connection, then 0.2 s at the platform
        answer = json_answer({"code": 0, "msg": "success"})
        answer.queued = 0.3
        return answer

    tried = await RetryEngine(clock, metrics).attempt(request, body(), Attempt(1, 1.0), send, History(write=False))
    assert isinstance(tried.verdict, Verdict) and observed == [0.2]
    duration = metrics.registry.get_sample_value("imsidecar_upstream_attempt_duration_seconds_sum",
                                                 {"app": "bot", "upstream": "open"})
    assert duration is not None and abs(duration - 0.2) < 1e-9
