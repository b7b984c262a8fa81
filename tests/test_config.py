"""Config: the shape users write, every problem named by its path, secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.cli import main
from proxy.config import Address, ConfigError

GOOD = """
listen: 127.0.0.1:8080
admin_listen: 0.0.0.0:9464
apps:
  - name: sales-bot
    platform: feishu
    app_id: ${FEISHU_APP_ID}
    app_secret_file: {secret_file}
    token: tenant
  - name: ops-ding
    platform: dingtalk
    app_key: ${DINGTALK_APP_KEY:-dingdefault}
    app_secret: ${DINGTALK_APP_SECRET}
    upstreams:
      oapi: {base_url: https://oapi.dingtalk.com}
      api: {base_url: "https://gw.example.internal/dingtalk/"}
    expose:
      - {upstream: oapi, prefix: /dingtalk}
      - {upstream: api, prefix: /dingtalk-api}
      - {upstream: api, listen: 127.0.0.1:8082}
"""
ENV = {"FEISHU_APP_ID": "cli_a1b2", "DINGTALK_APP_SECRET": "ding-secret-value-123456"}


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.loads(text, env=ENV if env is None else env)
    return caught.value.problems


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "app_secret"
    path.write_text("feishu-secret-from-file-9876\n")
    return path


def test_the_documented_shape_parses(secret_file: Path) -> None:
    c = config.loads(GOOD.replace("{secret_file}", str(secret_file)), env=ENV)
    feishu, ding = c.apps
    assert feishu.client_id == "cli_a1b2" and feishu.client_secret.reveal() == "feishu-secret-from-file-9876"
    assert feishu.upstreams["open"].base_url == "https://open.feishu.cn"
    assert [(e.upstream, e.prefix) for e in feishu.expose] == [("open", "/sales-bot")]
    assert ding.client_id == "dingdefault"
    assert ding.upstreams["api"].base_url == "https://gw.example.internal/dingtalk"
    assert ding.expose[2].listen == Address("127.0.0.1", 8082) and ding.expose[2].prefix == ""
    assert c.listeners() == [Address("127.0.0.1", 8080), Address("127.0.0.1", 8082)]


def test_default_exposure_of_dingtalk_is_one_prefix_per_upstream() -> None:
    c = config.loads("apps: [{name: d, platform: dingtalk, app_key: k, app_secret: s}]", env={})
    assert [(e.upstream, e.prefix) for e in c.apps[0].expose] == [("oapi", "/d/oapi"), ("api", "/d/api")]


def test_lark_defaults_to_the_larksuite_domain() -> None:
    c = config.loads("apps: [{name: l, platform: lark, app_id: i, app_secret: s}]", env={})
    assert c.apps[0].upstreams["open"].base_url == "https://open.larksuite.com"


def test_loose_units_are_normalised() -> None:
    c = config.loads("limits: {deadline: 2500ms, max_request_bytes: 2MiB}\n"
                     "apps: [{name: l, platform: lark, app_id: i, app_secret: s, retry: {per_try_timeout: 2}}]", env={})
    assert c.limits.deadline == 2.5 and c.limits.max_request_bytes == 2 * 1024 * 1024
    assert c.limits.replay_buffer_bytes == 2 * 1024 * 1024   # the default buffer never exceeds the limit
    assert c.apps[0].retry.per_try_timeout == 2.0


@pytest.mark.parametrize("text, expected", [
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: '${NOPE}'}]", "apps[0].app_secret: ${NOPE} is not set"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, retry: {max_atempts: 3}}]",
     "apps[0].retry.max_atempts: unknown key"),
    ("apps: [{name: a, platform: feishu, app_id: i}]", "apps[0].app_secret: is required"),
    ("apps: [{name: a, platform: feishu, app_id: '', app_secret: s}]", "apps[0].app_id: is empty"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret_file: /no/such/file}]",
     "apps[0].app_secret_file: cannot read /no/such/file"),
    ("apps: [{name: a, platform: wechat, app_id: i, app_secret: s}]", "apps[0].platform: 'wechat' is not one of"),
    ("apps: [{name: Sales_Bot, platform: feishu, app_id: i, app_secret: s}]", "apps[0].name: 'Sales_Bot' must match"),
    ("listen: 8080\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]", "listen: '8080' is not a host:port"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, upstreams: {open: {base_url: 'ftp://x'}}}]",
     "apps[0].upstreams.open.base_url: 'ftp://x' is not an http(s) base URL"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: s}, {name: a, platform: lark, app_id: i, app_secret: s}]",
     "apps[1].name: duplicate app name 'a'"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, expose: [{upstream: open, prefix: /x}]},"
     " {name: b, platform: lark, app_id: i, app_secret: s, expose: [{upstream: open, prefix: /x}]}]",
     "apps[1].expose: 127.0.0.1:8080/x is already used by a"),
    ("apps: [{name: a, platform: feishu, app_id: i, app_secret: s, expose: [{upstream: open, listen: 0.0.0.0:9464}]}]",
     "apps[0].expose: port 9464 is the admin port"),
    ("bogus: 1\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]", "bogus: unknown key"),
    ("limits: {deadline: 0}\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]",
     "limits.deadline: must be more than zero"),
    ("tokens: {refresh_margin: 3h}\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]",
     "tokens.refresh_margin: must be under 30m"),
    ("tokens: {refresh_margin: 30m}\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]",
     "tokens.refresh_margin: must be under 30m"),
    ("limits: {max_request_bytes: 1MiB, replay_buffer_bytes: 4MiB}\n"
     "apps: [{name: a, platform: feishu, app_id: i, app_secret: s}]",
     "limits.replay_buffer_bytes: is larger than max_request_bytes (1048576 bytes)"),
])
def test_each_problem_is_named_by_its_path(text: str, expected: str) -> None:
    found = problems(text, env={})
    assert any(p.startswith(expected) for p in found), found


def test_the_limits_at_their_edges_are_accepted() -> None:
    c = config.loads("limits: {deadline: 1ms, max_request_bytes: 4MiB, replay_buffer_bytes: 4MiB}\n"
                     "tokens: {refresh_margin: 29m}\napps: [{name: a, platform: feishu, app_id: i, app_secret: s}]",
                     env={})
    assert c.limits.deadline == 0.001 and c.tokens.refresh_margin == 29 * 60


def test_all_problems_are_reported_at_once() -> None:
    found = problems("apps: [{name: A, platform: feishu, app_id: i, app_secret: '${X}', extra: 1}]", env={})
    assert len(found) == 3


def test_check_config_masks_secrets_and_exits_0(tmp_path: Path, secret_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("{secret_file}", str(secret_file)))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sales-bot" in out and "http://127.0.0.1:8082/... -> https://gw.example.internal/dingtalk" in out
    assert "feishu-secret-from-file-9876" not in out and ENV["DINGTALK_APP_SECRET"] not in out
    assert "secret=**** " in out and "fe" not in out.split("secret=")[1][:6]   # not a character of it


SECRETS = {name: f"Zq{i}Xw{i}Vk{i}Jp{i}" for i, name in enumerate(
    ("FEISHU_SECRET", "ROBOT_TOKEN", "ROBOT_SECRET", "HOOK_TOKEN", "VERIFY", "ENCRYPT", "PROXY_PASSWORD", "STREAM_SECRET"))}
EVERYTHING = """
listen: 127.0.0.1:8080
admin_listen: 0.0.0.0:9464
readiness: {wait_for_tokens: true}
egress: {proxy: "http://proxy.corp.example:3128", username: svc, password: "${PROXY_PASSWORD}", no_proxy: [.corp]}
apps: [{name: lark-bot, platform: lark, app_id: cli_l, app_secret: "${FEISHU_SECRET}"}]
robots:
  targets:
    - {name: ops, platform: dingtalk, token: "${ROBOT_TOKEN}", secret: "${ROBOT_SECRET}", keyword: alert}
    - {name: dev, platform: feishu, webhook: "https://open.feishu.cn/open-apis/bot/v2/hook/${HOOK_TOKEN}"}
events:
  listen: 0.0.0.0:8090
  apps:
    - {name: fs-cb, platform: feishu, app_id: cli_e, verification_token: "${VERIFY}", encrypt_key: "${ENCRYPT}",
       deliver_to: "http://127.0.0.1:3000/events"}
    - {name: lark-stream, platform: lark, mode: stream, app_id: cli_s, app_secret: "${STREAM_SECRET}",
       deliver_to: "http://127.0.0.1:3000/events"}
"""


def test_the_summary_covers_robots_events_and_egress_and_shows_no_character_of_a_secret() -> None:
    from proxy.cli import summary

    text = summary(config.loads(EVERYTHING, env=SECRETS))
    assert "then waits for every app's first token (readiness.wait_for_tokens)" in text
    assert "egress https/wss via http://proxy.corp.example:3128 as svc (password ****), http/ws via" in text
    assert "app lark-bot (lark) id=cli_l secret=**** token=tenant" in text
    assert "-> https://open.larksuite.com" in text
    assert "robot ops (dingtalk) -> https://oapi.dingtalk.com/**** (signed, keyword 'alert')" in text
    assert "robot dev (feishu) -> https://open.feishu.cn/**** (unsigned)" in text
    assert "events fs-cb (feishu) callback /events/fs-cb -> http://127.0.0.1:3000/events" in text
    assert "events lark-stream (feishu) stream from https://open.larksuite.com -> http://127.0.0.1:3000/events" in text
    for value in SECRETS.values():
        assert not any(value[i:i + 3] in text for i in range(len(value) - 2)), value   # not three characters


def test_bad_config_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("apps: [{name: a, platform: feishu, app_id: i, app_secret: '${UNSET_FOR_TEST}', x: 1}]")
    assert main(["check-config", str(path)]) == 2
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "imsidecar: config: apps[0].app_secret: ${UNSET_FOR_TEST} is not set" in err
    assert "imsidecar: config: apps[0].x: unknown key" in err
    assert "Traceback" not in err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2


def test_secret_repr_is_masked() -> None:
    c = config.loads("apps: [{name: a, platform: feishu, app_id: i, app_secret: very-secret-value-1}]", env={})
    assert "very-secret-value-1" not in repr(c)


def test_shipped_examples_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).parent.parent / "config"
    secret = tmp_path / "app_secret"
    secret.write_text("s3cret-from-a-mounted-file")
    env = {"FEISHU_APP_ID": "cli_x", "FEISHU_APP_SECRET": "x" * 16, "DINGTALK_APP_KEY": "k", "DINGTALK_APP_SECRET": "y" * 16,
           "DINGTALK_ROBOT_TOKEN": "t" * 16, "DINGTALK_ROBOT_SECRET": "SEC" + "s" * 16, "FEISHU_HOOK_TOKEN": "h" * 16,
           "FEISHU_HOOK_SECRET": "f" * 16, "FEISHU_VERIFICATION_TOKEN": "v" * 16, "FEISHU_ENCRYPT_KEY": "e" * 16}
    for path in sorted(root.glob("*.yaml")):
        text = path.read_text().replace("/var/run/secrets/feishu/app_secret", str(secret))
        loaded = config.loads(text, env=env)
        assert loaded.apps or loaded.robots, path.name


def test_the_full_example_pins_no_adaptive_parameter(tmp_path: Path) -> None:
    """config/imsidecar.yaml lists every key; one set there would be pinned and stop adapting for every app."""
    secret = tmp_path / "app_secret"
    secret.write_text("s3cret-from-a-mounted-file")
    text = (Path(__file__).parent.parent / "config" / "imsidecar.yaml").read_text()
    loaded = config.loads(text.replace("/var/run/secrets/feishu/app_secret", str(secret)),
                          env={"FEISHU_APP_ID": "cli_x", "DINGTALK_APP_KEY": "k", "DINGTALK_APP_SECRET": "y" * 16})
    assert [(app.name, app.retry.adaptive, app.retry.pinned) for app in loaded.apps] == [
        ("sales-bot", True, frozenset()), ("ops-ding", True, frozenset())]
