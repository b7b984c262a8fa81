"""The `imsidecar` process: `run` drains in-flight requests on SIGTERM and exits 0; `demo` works with no credentials."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from proxy.cli import fault_share, main
from proxy.demo import banner

from tests.conftest import FEISHU_SECRET, Platforms, wait_ready

MESSAGE = {"receive_id": "oc_1", "msg_type": "text", "content": json.dumps({"text": "hi"})}


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_run_drains_in_flight_requests_on_sigterm(platforms: Platforms, tmp_path: Path) -> None:
    listen, admin = unused_port(), unused_port()
    path = tmp_path / "config.yaml"
    path.write_text(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
logging: {{format: json}}
apps:
  - name: sales-bot
    platform: feishu
    app_id: cli_test
    app_secret_file: {tmp_path / "secret"}
    upstreams: {{open: {{base_url: "{platforms.feishu_url}"}}}}
""")
    (tmp_path / "secret").write_text(FEISHU_SECRET + "\n")
    process = await spawn("run", "--config", str(path))
    platforms.feishu.faults.hang_seconds = 0.5
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, f"http://127.0.0.1:{admin}/readyz", process)
        async with http.get(f"http://127.0.0.1:{admin}/healthz") as r:   # uvloop whenever it is installed
            assert (await r.json())["event_loop"] == ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
        platforms.feishu.faults.script.append("hang")
        slow = asyncio.create_task(http.post(f"http://127.0.0.1:{listen}/sales-bot/open-apis/im/v1/messages", json=MESSAGE))
        await asyncio.sleep(0.2)   # the request is now waiting on the platform
        process.send_signal(signal.SIGTERM)
        response = await slow
        assert response.status == 200 and (await response.json())["code"] == 0
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "imsidecar.access"]
    assert access and access[0]["route"] == "/open-apis/im/v1/messages" and access[0]["attempts"] == 1
    assert access[0]["outcome"] == "success"   # the outcome class, as imsidecar_requests_total counts it
    assert FEISHU_SECRET not in stderr.decode()


async def test_demo_needs_no_credentials_and_stops_cleanly() -> None:
    listen, admin = unused_port(), unused_port()
    process = await spawn("demo", "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}")
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, f"http://127.0.0.1:{admin}/readyz", process)
        url = f"http://127.0.0.1:{listen}/demo-feishu/open-apis/im/v1/messages?receive_id_type=chat_id"
        async with http.post(url, json=MESSAGE) as r:
            assert (await r.json())["code"] == 0
        async with http.post(f"http://127.0.0.1:{listen}/demo-ding/oapi/topapi/v2/user/get",
                             json={"userid": "manager001"}) as r:
            assert (await r.json())["errcode"] == 0
    process.send_signal(signal.SIGINT)
    stdout, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert f"http://127.0.0.1:{listen}/demo-feishu" in stdout.decode() and "curl" in stdout.decode()


def test_demo_faults_take_a_share_or_a_percentage(capsys: pytest.CaptureFixture[str]) -> None:
    assert fault_share("0.05") == 0.05 and fault_share("5%") == 0.05 and fault_share("1") == 1.0
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--faults", "5"])
    assert exited.value.code == 2
    assert "'5' is not a share between 0 and 1 (0.05) or a percentage (5%)" in capsys.readouterr().err
    assert "5% of platform calls fail" in banner("127.0.0.1:8080", "127.0.0.1:9464", 0.05)


def minimal_config(tmp_path: Path, platforms: Platforms, listen: int, admin: int, limits: str = "{}") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"""
listen: 127.0.0.1:{listen}
admin_listen: 127.0.0.1:{admin}
limits: {limits}
logging: {{format: json}}
apps:
  - name: sales-bot
    platform: feishu
    app_id: cli_test
    app_secret: {FEISHU_SECRET}
    upstreams: {{open: {{base_url: "{platforms.feishu_url}"}}}}
""")
    return path


async def test_a_port_in_use_is_one_line_and_exit_2(platforms: Platforms, tmp_path: Path) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        process = await spawn("run", "--config", str(minimal_config(tmp_path, platforms, port, unused_port())))
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        taken.close()
    lines = [line for line in stderr.decode().splitlines() if not line.startswith("{")]
    assert process.returncode == 2
    assert lines == [f"imsidecar: cannot start: cannot listen on 127.0.0.1:{port}: address already in use"], lines
    assert "Traceback" not in stderr.decode()


async def test_a_config_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listen: 127.0.0.1:8080\napps: []\n# caf\xe9\n")
    for command in (["run", "--config", str(path)], ["check-config", str(path)]):
        process = await spawn(*command)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 2
        assert stderr.decode().strip() == f"imsidecar: config: {path}: not UTF-8 text (byte 37 is 0xe9)"


async def test_sigterm_answers_a_request_the_platform_never_answers_then_exits_0(platforms: Platforms,
                                                                                 tmp_path: Path) -> None:
    listen, admin = unused_port(), unused_port()
    path = minimal_config(tmp_path, platforms, listen, admin, "{drain_timeout: 1s, deadline: 60s}")
    process = await spawn("run", "--config", str(path))
    platforms.feishu.faults.hang_seconds = 30
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, f"http://127.0.0.1:{admin}/readyz", process)
        platforms.feishu.faults.script.append("hang")
        stuck = asyncio.create_task(http.post(f"http://127.0.0.1:{listen}/sales-bot/open-apis/im/v1/messages",
                                              json=MESSAGE))
        await asyncio.sleep(0.2)   # the request is now waiting on the platform
        process.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(stuck, 20)
        # a write the platform had: it may have been applied, and the answer says so
        assert response.status == 502 and response.headers["X-Imsidecar-Error"] == "OutcomeUnknown"
        assert response.headers["X-Imsidecar-Outcome"] == "unknown"
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()[-2000:]


def test_run_builds_with_the_collector_off_and_serves_with_it_on(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Left off, every cycle the sidecar ever makes would be kept for good."""
    import gc

    from proxy import cli

    path = tmp_path / "config.yaml"
    path.write_text("apps: [{name: a, platform: feishu, app_id: i, app_secret: s}]\n")
    seen: dict[str, object] = {}

    async def serving(loaded: object) -> None:   # `run`, up to where the sidecar is built
        seen["building"] = gc.isenabled()
        cli.freeze_built_objects()
        seen["serving"], seen["thresholds"] = gc.isenabled(), gc.get_threshold()

    before = gc.get_threshold()
    monkeypatch.setattr(cli, "run", serving)
    monkeypatch.setattr(cli, "install_fast_loop", lambda: None)
    try:
        assert main(["run", "--config", str(path)]) == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.enable()
    assert seen == {"building": False, "serving": True, "thresholds": cli.GC_THRESHOLDS}
