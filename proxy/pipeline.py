"""The forwarding pipeline: where one client request goes, stage by stage, read top to bottom in `handle`.

Owns the order of the stages and the shape of what goes back to the client, including the last-resort answer
when something inside the sidecar breaks and the 499 of a client that left; each stage's rules live in its module.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from typing import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.bindings import Binding
from proxy.clock import Clock
from proxy.config import Address, Limits
from proxy.drain import Drain
from proxy.errors import (AttemptFailed, AttemptTimeout, ClientGone, DeadlineExceeded, InternalError, NoRoute,
                          OutcomeUnknown, ShuttingDown, SidecarError, TokenUnavailableError)
from proxy.exactly_once import ExactlyOnce, MemoryOnce, Stored
from proxy.guard import Guard
from proxy.history import READS
from proxy.idempotency import ECHO_HEADER
from proxy.intake import BodyReader, RequestBody, target_problem
from proxy.logs import access
from proxy.metrics import CLIENT_ERROR, SUCCESS, Metrics, outcome_class
from proxy.outcome import Verdict
from proxy.platforms.base import BAD_REQUEST, INTERNAL_ERROR, dump
from proxy.retry import Attempt, RetryEngine
from proxy.routing import Router
from proxy.saving.stages import SavingStages
from proxy.tokens import TokenUnavailable
from proxy.units import UnitError, parse_seconds
from proxy.upstream import HOP_BY_HOP, Answer, LeftInFlight, answer_of, forward_headers

DEADLINE_HEADER = "X-Imsidecar-Timeout"   # a client may shorten (never lengthen) its request's deadline
CHUNK = 64 * 1024
STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 10)}   # 100..999: what aiohttp lets a status be


@dataclass(slots=True)
class Exchange:
    """One client request on its way through the sidecar."""

    binding: Binding
    method: str
    path: str          # after the prefix, as the client encoded it
    query: str
    headers: CIMultiDict[str]
    template: str      # the route with its IDs replaced: what rules (idempotency, idempotent routes) match on
    route: str         # the template, or "other" past the per-app cap: for labels and logs
    started: float
    deadline: float
    token_kind: str | None = None   # decided once, from what the client sent (None: its own user token)
    attempts: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    has_idempotency_key: bool = False   # the platform's own key is in the request (the client's, or ours)
    client_deadline: bool = False   # the client shortened the deadline (X-Imsidecar-Timeout)
    verdict: Verdict | None = None        # the platform's classification of the answer relayed (set by the retry loop)
    error: SidecarError | None = None     # the sidecar's own error, when it answered with one
    priority: str = "interactive"                          # its lane (proxy/saving/lanes.py)
    marks: dict[str, str] = field(default_factory=dict)    # X-Imsidecar-* and Age headers the stages add to the answer
    client_key: str | None = None       # the client's Idempotency-Key
    idempotency_key: str | None = None  # the key to send back as Idempotency-Key to rerun this request (echoed)
    outcome: str = "not-applied"        # X-Imsidecar-Outcome: applied | not-applied | unknown
    retry_safe: bool = True             # the final answer says the platform did not act: resending is safe
    replayed: Stored | None = None      # the stored answer given again to a repeat of an Idempotency-Key
    heard_out: asyncio.Task[Answer] | None = None   # the last attempt cut off by a timeout, whose answer may come


class Pipeline:
    def __init__(self, router: Router[Binding], retry: RetryEngine, clock: Clock, limits: Limits, metrics: Metrics,
                 saving: SavingStages, *, guard: Guard | None = None, drain: Drain | None = None,
                 once: ExactlyOnce | None = None) -> None:
        self.router, self.retry, self.clock, self.limits, self.metrics = router, retry, clock, limits, metrics
        self.guard = guard or Guard(metrics.stage_failures)
        self.drain = drain or retry.drain
        self.bodies = BodyReader(limits, clock)
        self.saving = saving
        self.once = once or ExactlyOnce(MemoryOnce(clock), clock, metrics, self.drain)
        self.once.render = self.error_response   # what a stored sidecar error looked like to its client
        self._late: dict[Binding, Callable[[float], None]] = {}

    async def handle(self, request: web.BaseRequest, listen: Address) -> web.StreamResponse:
        try:
            return await self.dispatch(request, listen)
        except Exception as exc:   # last resort: a bug still gets an answer in the platform's shape, and is counted
            self.guard.failed("pipeline", exc)
            return unrouted(request, self.crashed(listen, request))

    async def dispatch(self, request: web.BaseRequest, listen: Address) -> web.StreamResponse:
        target = request.raw_path
        refused = target_problem(request.method, target)
        path, _, query = target.partition("?")
        if refused is not None:
            path = path.partition("#")[0]   # only a refused target can carry one
        match = self.router.resolve(listen, path if path.startswith("/") and refused is None else "/")
        if match is None:
            return self.no_route(listen, path) if refused is None else unrouted(request, self.refuse(listen, refused))
        exchange = self.start(request, match.target, match.path, query)
        if refused is not None:
            return self.answer(exchange, self.error_response(exchange, refused))
        in_flight = self.metrics.hot_in_flight(exchange.binding.app.name)
        in_flight.inc()
        try:
            response = await self.forward(request, exchange)
        except SidecarError as exc:
            response = self.error_response(exchange, exc)
        except asyncio.CancelledError:
            response = self.abandoned(exchange)   # re-raises unless the drain's end cut it short
        except Exception as exc:
            self.guard.failed("pipeline", exc)
            response = self.error_response(exchange, InternalError("the sidecar failed; the failure is logged"))
        finally:
            in_flight.dec()
        return self.answer(exchange, response)

    def answer(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        try:
            self.record(exchange, response)
        except Exception as exc:   # an answer is never lost to its own bookkeeping
            self.guard.failed("pipeline", exc)
        return response

    def abandoned(self, exchange: Exchange) -> web.StreamResponse:
        """Cancelled: the client disconnected (aiohttp cancels its handler), or the drain ran out of time."""
        task = asyncio.current_task()
        if task is not None and self.drain.was_cut(task):
            return self.error_response(exchange, self.cut_short(exchange))
        self.answer(exchange, self.error_response(exchange, ClientGone("the client disconnected")))
        raise asyncio.CancelledError

    @staticmethod
    def cut_short(exchange: Exchange) -> SidecarError:
        """What a request the drain's end cut short is told. A write with an attempt out may have been applied: not a
        503 and `not-applied`, which say (and make clients) send it again; a read, or nothing sent yet, may be."""
        if exchange.attempts and exchange.method not in READS:
            exchange.outcome, exchange.retry_safe = "unknown", False
            return OutcomeUnknown("the sidecar shut down before the platform answered; it may have been applied: "
                                  "send it again only with the same idempotency key")
        return ShuttingDown("the sidecar shut down before the platform answered; send it again")

    async def forward(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        b = exchange.binding
        token_kind = b.platform.token_endpoint(b.upstream, exchange.method, exchange.path)
        if token_kind is not None:
            return await self.answer_token_endpoint(exchange, token_kind)
        self.saving.lanes.assign(exchange, request.headers)   # interactive or bulk, before anything waits
        body = await self.bodies.read(request, exchange.deadline)
        answer = await self.once.through(exchange, body, self.cached)
        return await self.relay(request, exchange, answer)

    # The exactly-once and quota-saving stages, outermost first; each may answer without calling the next -------
    # (a repeat of an Idempotency-Key gets its stored answer from proxy/exactly_once.py before any of proxy/saving/)

    # (each returns the next stage's awaitable, so a request a stage lets by pays no coroutine layer for it)

    def cached(self, exchange: Exchange, body: RequestBody) -> Awaitable[Answer]:
        """Read-mostly routes answered from the cache while fresh."""
        return self.saving.cache.through(exchange, body, self.coalesced)

    def coalesced(self, exchange: Exchange, body: RequestBody) -> Awaitable[Answer]:
        """Identical concurrent reads share one platform call."""
        return self.saving.coalescer.through(exchange, body, self.merged)

    def merged(self, exchange: Exchange, body: RequestBody) -> Awaitable[Answer]:
        """One card's updates go in order, the newest of a run replacing the ones before it."""
        return self.saving.cards.through(exchange, body, self.call_platform)

    def call_platform(self, exchange: Exchange, body: RequestBody) -> Awaitable[Answer]:
        """Past the month's reserve a bulk call stops here; otherwise the retry loop, every attempt counted."""
        self.saving.meter.admit(exchange)
        self.saving.lanes.enter(exchange)
        return self.retry.run(exchange, body, self.send_attempt)

    # Stages ---------------------------------------------------------------------------------------------------

    def start(self, request: web.BaseRequest, binding: Binding, path: str, query: str) -> Exchange:
        now = self.clock.now()
        budget = self.limits.deadline
        asked = request.headers.get(DEADLINE_HEADER)
        if asked:
            try:
                budget = min(budget, parse_seconds(asked))
            except UnitError:
                pass   # a malformed hint is ignored rather than failing the call
        headers = forward_headers(request.headers)
        template = binding.shapes.template(path)   # the platform's route template (Platform.route_template)
        route = binding.routes.label(template)
        kind = binding.platform.token_kind(binding.upstream, headers)
        return Exchange(binding, request.method, path, query, headers, template, route, now, now + budget, kind,
                        client_deadline=budget < self.limits.deadline)

    async def answer_token_endpoint(self, exchange: Exchange, kind: str) -> web.Response:
        """Official SDKs fetch tokens themselves: answer from the sidecar's cache, with a placeholder token."""
        b = exchange.binding
        source = b.tokens.source(kind)
        try:
            await source.get(exchange.deadline)
        except TokenUnavailable as exc:
            raise TokenUnavailableError(f"app {b.app.name}: no token: {exc}") from exc
        answer = b.platform.token_endpoint_answer(kind, source.seconds_to_expiry())
        self.metrics.local_answers.labels(b.app.name).inc()
        return web.Response(status=answer.status, body=answer.body, content_type="application/json", charset="utf-8")

    async def send_attempt(self, exchange: Exchange, body: RequestBody, attempt: Attempt) -> Answer:
        """One attempt: the token (unless the client sent a user token), then the bytes to the platform."""
        b = exchange.binding
        headers = exchange.headers   # the token is set afresh on every attempt, so the request's own copy serves
        query = attempt.query if attempt.query is not None else exchange.query
        kind = exchange.token_kind
        attempt.token = None
        if kind is not None:
            try:
                attempt.token = await b.tokens.source(kind).get(exchange.deadline)
            except TokenUnavailable as exc:
                raise TokenUnavailableError(f"app {b.app.name}: no token: {exc}") from exc
            attempt.token_kind = kind
            query = b.platform.attach_token(b.upstream, headers, query, attempt.token)
        data = attempt.body if attempt.body is not None else body.take()
        if body.length is not None and not body.replayable:
            headers["Content-Length"] = str(body.length)
        path_qs = exchange.path + (f"?{query}" if query else "")
        on_late = self.late_answers(b) if body.replayable else None   # a one-shot stream is not heard out
        try:
            answer = await b.client.send(exchange.method, path_qs, headers, data, attempt.timeout, on_late,
                                         within=exchange.deadline - self.clock.now())   # the deadline: wall time
        except LeftInFlight as left:   # its client left once it was out: the platform counts it, so does the meter
            left.attempt.add_done_callback(partial(self.counted_when_answered, exchange))
            raise
        except AttemptFailed as exc:
            if isinstance(exc, AttemptTimeout) and exc.heard_out is not None:   # so it does if its late answer comes
                exc.heard_out.add_done_callback(partial(self.counted_when_answered, exchange))
                exchange.heard_out = exc.heard_out
            if body.fault is not None:   # the client failed the stream: its fault, not the platform's or the network's
                raise body.fault from None
            if isinstance(exc, AttemptTimeout) and self.cut_by_client(exchange, attempt):
                cut = DeadlineExceeded("the deadline this request asked for (X-Imsidecar-Timeout) passed "
                                       "before the platform answered")
                cut.unsent = not exc.verdict.processed   # a connection still being made: nothing went out
                raise cut from exc
            raise
        self.saving.meter.counted(exchange, answer)   # every answered attempt, as the platform counts it
        return answer

    def counted_when_answered(self, exchange: Exchange, attempt: asyncio.Task[Answer]) -> None:
        """An attempt the request stopped waiting for (it timed out, its client left), counted if it was answered."""
        answer = answer_of(attempt)
        if answer is not None:
            self.saving.meter.counted(exchange, answer)

    def late_answers(self, b: Binding) -> Callable[[float], None]:
        """What hears a timed-out attempt's late answer: the binding's monitor and breaker, and a counter."""
        heard = self._late.get(b)
        if heard is None:
            def heard(latency: float) -> None:   # rare: the counter's child is made at the first (it exports 0 before)
                self.metrics.late_answers.labels(b.app.name, b.upstream).inc()
                b.observe_late(latency)
            self._late[b] = heard
        return heard

    def cut_by_client(self, exchange: Exchange, attempt: Attempt) -> bool:
        """An attempt cut short by the client's own, shorter deadline says nothing against the platform: it is
        not fed to the monitor and breaker (25 calls with `X-Imsidecar-Timeout: 1ms` would open the circuit)."""
        if not exchange.client_deadline:
            return False
        return attempt.timeout < exchange.binding.policy.params().per_try_timeout

    async def relay(self, request: web.BaseRequest, exchange: Exchange, answer: Answer) -> web.StreamResponse:
        headers = relayed_headers(answer.headers)
        self.tag(exchange, headers)
        if answer.stream is None:
            return web.Response(status=answer.status, headers=headers, body=answer.body)
        response = web.StreamResponse(status=answer.status, headers=headers)
        if answer.stream.content_length is not None:
            response.content_length = answer.stream.content_length
        try:
            await response.prepare(request)
            async for chunk in answer.chunks(CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError as exc:   # the client went away mid-download
            raise ClientGone("the client disconnected while the answer was being sent") from exc
        finally:
            answer.release()
        return response

    # Answers of the sidecar's own -------------------------------------------------------------------------------

    def error_response(self, exchange: Exchange, exc: SidecarError) -> web.Response:
        b = exchange.binding
        exchange.error = exc
        body = b.platform.error_body(b.upstream, exc.code, f"imsidecar: {exc}")
        headers = CIMultiDict({"Content-Type": "application/json; charset=utf-8", "X-Imsidecar-Error": type(exc).__name__})
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        self.tag(exchange, headers)
        return web.Response(status=exc.status, headers=headers, body=body)

    def no_route(self, listen: Address, path: str) -> web.Response:
        known = self.router.prefixes(listen)
        message = f"imsidecar: no app is configured under this path on {listen}; configured prefixes: {', '.join(known) or 'none'}"
        body = dump({"code": NoRoute.code, "msg": message, "error": "imsidecar.noRoute", "prefixes": known})
        return web.Response(status=404, body=body, content_type="application/json", charset="utf-8",
                            headers={"X-Imsidecar-Error": NoRoute.__name__})

    def refuse(self, listen: Address, exc: SidecarError) -> web.Response:
        """A target refused where no app can be told from it (a shared listener): 400 in both error shapes."""
        self.metrics.client_faults.labels(str(listen), "bad_target").inc()
        headers = {"X-Imsidecar-Error": type(exc).__name__}
        return web.Response(status=exc.status, body=self.listener_error(listen, exc.code, f"imsidecar: {exc}"),
                            headers=headers, content_type="application/json", charset="utf-8")

    def crashed(self, listen: Address, request: web.BaseRequest) -> web.Response:
        body = self.listener_error(listen, INTERNAL_ERROR, "imsidecar: the sidecar failed; the failure is logged")
        return web.Response(status=500, body=body, headers={"X-Imsidecar-Error": "InternalError"},
                            content_type="application/json", charset="utf-8")

    def listener_error(self, listen: Address, code: int, message: str) -> bytes:
        """An error body for a listener: its platform's shape on a port of one upstream, else Feishu's and
        DingTalk oapi's together (as the robots' unknown-target answer)."""
        match = self.router.resolve(listen, "/")
        if match is not None and match.prefix == "":
            return match.target.platform.error_body(match.target.upstream, code, message)
        return dump({"code": code, "msg": message, "errcode": code, "errmsg": message,
                     "error": "imsidecar.badRequest" if code == BAD_REQUEST else "imsidecar.error"})

    @staticmethod
    def tag(exchange: Exchange, headers: CIMultiDict[str]) -> None:
        headers["X-Imsidecar-Attempts"] = str(exchange.attempts)
        if exchange.retry_reasons:
            headers["X-Imsidecar-Retry-Reasons"] = ",".join(exchange.retry_reasons)
        headers["X-Imsidecar-Outcome"] = exchange.outcome
        if exchange.idempotency_key is not None:
            headers[ECHO_HEADER] = exchange.idempotency_key
        if exchange.replayed is not None:
            headers["X-Imsidecar-Replayed"] = "true" if exchange.replayed.body is not None else "true; body not kept"
            if exchange.replayed.error:
                headers["X-Imsidecar-Error"] = exchange.replayed.error
        if exchange.marks:
            headers.update(exchange.marks)

    def record(self, exchange: Exchange, response: web.StreamResponse) -> None:
        """Count the request once, under the outcome class of what its client got."""
        b = exchange.binding
        elapsed = self.clock.now() - exchange.started
        status_class, outcome = STATUS_CLASSES.get(response.status // 100, "other"), self.outcome(exchange, response)
        self.metrics.hot_requests(b.app.name, b.upstream, exchange.route, exchange.method, status_class, outcome).inc()
        self.metrics.hot_request_duration(b.app.name, b.upstream, exchange.route).observe(elapsed)
        if exchange.error is not None:
            self.metrics.sidecar_errors.labels(b.app.name, b.upstream, type(exchange.error).__name__).inc()
        if not access.enabled:
            return
        access.write(
            f"{b.app.name} {b.upstream} {exchange.method} {exchange.route} {response.status} "
            f"attempts={exchange.attempts} {elapsed * 1000:.1f}ms",
            {"app": b.app.name, "upstream": b.upstream, "route": exchange.route, "method": exchange.method,
             "status": response.status, "outcome": outcome, "attempts": exchange.attempts,
             "duration_ms": round(elapsed * 1000, 1), "retry_reasons": exchange.retry_reasons},
        )

    @staticmethod
    def outcome(exchange: Exchange, response: web.StreamResponse) -> str:
        """The sidecar's own error's class; else the platform's verdict on the answer relayed (an error inside
        HTTP 200 is an error); else (an answer the sidecar gave from its cache) by status."""
        if exchange.error is not None:
            return exchange.error.counted_as
        if exchange.verdict is not None:
            return outcome_class(exchange.verdict, sidecar_token=exchange.token_kind is not None)
        return SUCCESS if response.status < 400 else CLIENT_ERROR


def relayed_headers(source: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The platform's headers, minus hop-by-hop ones and any X-Imsidecar-* (only this sidecar may say those)."""
    kept = CIMultiDict(source)
    dropped = [name for name in kept if (lower := name.lower()) in HOP_BY_HOP or lower.startswith("x-imsidecar-")]
    for name in dropped:
        kept.popall(name, None)
    return kept


def unrouted(request: web.BaseRequest, response: web.Response) -> web.Response:
    """The access line of an answer given before any app could be told from the request (no app, no route)."""
    if access.enabled:
        method = request.method if len(request.method) <= 10 else "other"
        access.write(f"- - {method} - {response.status} attempts=0",
                     {"app": "-", "upstream": "-", "route": "-", "method": method, "status": response.status,
                      "attempts": 0, "duration_ms": 0.0, "retry_reasons": []})
    return response


__all__ = ["Exchange", "Pipeline", "RequestBody"]
