"""`imsidecar events dead-letters` and `imsidecar events replay`: against the journal (also while the sidecar runs
and delivers what is replayed) and a real Redis; never printing a body; problems named, with exit codes 1 and 2."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.app import Sidecar
from proxy.cli import main
from proxy.clock import SystemClock
from proxy.events.journal import Journal
from proxy.events.queue import Event
from proxy.fakes.events import FakeApplication, FeishuPusher, wait_for
from tests.conftest import distinct_ports
from tests.events_support import serve
from tests.redis_support import running_redis

SECRET_IN_BODY = "verification-token-in-the-body"


def write_config(tmp_path: Path, queue: str, store: str = "", app_url: str = "http://127.0.0.1:9/events",
                 events_port: int | None = None) -> Path:
    listen, admin, port = distinct_ports(3)
    path = tmp_path / "config.yaml"
    path.write_text(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
{store}
events:
  listen: 127.0.0.1:{events_port or port}
  queue: {queue}
  apps:
    - {{name: fs, platform: feishu, app_id: cli_1, verification_token: vt, deliver_to: "{app_url}",
        delivery: {{backoff_base: 10ms, backoff_cap: 20ms}}}}
    - {{name: other, platform: feishu, app_id: cli_2, verification_token: vt, deliver_to: "{app_url}",
        callback_path: /events/other}}
""")
    return path


async def bury(store, keys: list[str]) -> None:  # type: ignore[no-untyped-def]
    for key in keys:
        body = f'{{"header": {{"token": "{SECRET_IN_BODY}"}}, "key": "{key}"}}'.encode()
        await store.admit("fs", Event(key, body, (("X-Imsidecar-Event-Type", "im.message.receive_v1"),),
                                      time.time()), 43200, 100)
        await store.bury("fs", await store.head("fs"), "expired", 12)


async def run(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", *argv,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(), err.decode()


async def test_dead_letters_are_listed_without_their_bodies_and_replayed_from_the_journal(tmp_path):
    path = write_config(tmp_path, f'{{path: "{tmp_path / "events.db"}"}}')
    journal = Journal(str(tmp_path / "events.db"), SystemClock(), 100)
    await journal.start()
    await bury(journal, ["ev-1", "ev-2", "ev-3"])
    code, out, _ = await run("events", "dead-letters", "--config", str(path))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("fs id=1 reason=expired attempts=12 received=")
    assert 'key="ev-1" type=im.message.receive_v1 bytes=' in lines[0]
    assert SECRET_IN_BODY not in out
    assert (await run("events", "replay", "--config", str(path), "--app", "fs", "2"))[1].strip() == \
        "queued 1 dead letter of fs again"
    assert (await journal.head("fs")).event.key == "ev-2"
    code, out, _ = await run("events", "replay", "--config", str(path), "--app", "fs", "--all")
    assert (code, out.strip()) == (0, "queued 2 dead letters of fs again")
    assert (await run("events", "dead-letters", "--config", str(path), "--app", "other"))[1].strip() == \
        "no dead letters"
    await journal.close()


async def test_dead_letters_in_redis(tmp_path):
    async with running_redis(tmp_path) as server:
        path = write_config(tmp_path, "{backend: redis}", f"store: {{backend: redis, url: '{server.url}'}}")
        from proxy.events.redis_stream import RedisEventStore
        from proxy.store import StoreSettings
        store = RedisEventStore(StoreSettings(backend="redis", url=server.url), SystemClock(), 100)
        await bury(store, ["ev-1"])
        code, out, _ = await run("events", "dead-letters", "--config", str(path), "--app", "fs")
        assert code == 0 and 'reason=expired attempts=12' in out and SECRET_IN_BODY not in out
        dead_id = out.split("id=")[1].split()[0]
        assert (await run("events", "replay", "--config", str(path), "--app", "fs", dead_id))[0] == 0
        assert (await store.head("fs")).event.key == "ev-1"
        await store.close()


@pytest.mark.parametrize("argv, problem", [
    (["dead-letters", "--app", "nope"], "no events app 'nope'"),
    (["replay", "--app", "fs"], "replay needs --all or the ids"),
    (["replay", "--app", "fs", "--all", "1"], "replay needs --all or the ids"),
])
def test_arguments_that_do_not_fit_the_config_are_named(tmp_path, capsys, argv, problem):
    path = write_config(tmp_path, f'{{path: "{tmp_path / "events.db"}"}}')
    assert main(["events", *argv[:1], "--config", str(path), *argv[1:]]) == 2
    assert problem in capsys.readouterr().err


def test_the_memory_backend_has_nothing_to_show_from_outside(tmp_path, capsys):
    path = write_config(tmp_path, "{backend: memory}")
    assert main(["events", "dead-letters", "--config", str(path)]) == 1
    assert "the memory backend keeps dead letters inside the sidecar" in capsys.readouterr().err


def test_a_journal_that_cannot_be_opened_is_said_plainly(tmp_path, capsys):
    path = write_config(tmp_path, f'{{path: "{tmp_path / "no-such-dir" / "events.db"}"}}')
    assert main(["events", "dead-letters", "--config", str(path)]) == 1
    assert "events.queue.path: cannot open the journal" in capsys.readouterr().err


async def test_an_operator_replays_what_the_running_sidecar_dead_lettered_and_it_is_delivered(tmp_path,
                                                                                              aiohttp_server):
    application = FakeApplication(fail_next=1, status_when_failing=400)   # the app refuses it, then is fixed
    url = await serve(aiohttp_server, application.app(), "/events")
    (port,) = distinct_ports(1)
    path = write_config(tmp_path, f'{{path: "{tmp_path / "events.db"}"}}', app_url=url, events_port=port)
    sidecar = Sidecar(config.load(str(path)), registry=CollectorRegistry())
    await sidecar.start()
    try:
        pusher = FeishuPusher("cli_1", "vt", "", now=time.time)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/events/fs", data=pusher.envelope({"n": 1}),
                                 headers={"Content-Type": "application/json"}) as response:
                assert response.status == 200
        registry = sidecar.metrics.registry
        await wait_for(lambda: registry.get_sample_value("imsidecar_events_dead_lettered_total",
                                                         {"app": "fs", "reason": "app_rejected"}) == 1)
        code, out, _ = await run("events", "dead-letters", "--config", str(path), "--app", "fs")
        assert code == 0 and "reason=app_rejected attempts=1" in out
        assert (await run("events", "replay", "--config", str(path), "--app", "fs", "--all"))[0] == 0
        await wait_for(lambda: application.received, rounds=3000)   # the sidecar polls the journal
        assert application.received[0]["event"] == {"n": 1}
    finally:
        await sidecar.stop()
