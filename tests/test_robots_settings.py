import pytest

from proxy.robots.settings import Mentions, RobotConfigError, parse_robots
from proxy.secret import Secret


def test_token_and_base_url_build_the_webhook_and_secrets_stay_masked(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("SECabc\n")
    settings = parse_robots({
        "deadline": "10s",
        "targets": [
            {"name": "ops", "platform": "dingtalk", "token": "tok123", "secret_file": str(secret_file),
             "keyword": "alert", "mention": {"mobiles": ["13800000000"], "all": False}},
            {"name": "dev", "platform": "feishu", "webhook": "https://open.larksuite.com/open-apis/bot/v2/hook/hook-token-xyz",
             "mention": {"user_ids": ["ou_1"]}},
        ],
    })
    ops, dev = settings.targets["ops"], settings.targets["dev"]
    assert settings.deadline == 10.0
    assert ops.webhook.reveal() == "https://oapi.dingtalk.com/robot/send?access_token=tok123"
    assert ops.secret == Secret("SECabc")
    assert ops.mentions == Mentions(mobiles=("13800000000",))
    assert dev.webhook.reveal().endswith("/hook/hook-token-xyz") and dev.secret is None
    shown = repr(settings)
    assert "tok123" not in shown and "SECabc" not in shown and "hook-token-xyz" not in shown


def test_every_problem_is_named_by_its_path():
    with pytest.raises(RobotConfigError) as caught:
        parse_robots({"targets": [
            {"name": "a", "platform": "slack", "token": "t"},
            {"name": "b", "platform": "feishu", "token": "t", "webhook": "https://x/y", "colour": "red"},
            {"name": "c", "platform": "feishu", "token": "t", "mention": {"mobiles": ["1"]}},
            {"name": "d", "platform": "dingtalk", "token": "t", "templates": {"title": "${nope} ${status}"}},
            {"name": "d", "platform": "dingtalk", "token": "t"},
            {"name": "d", "platform": "dingtalk", "token": "t"},
        ]})
    problems = caught.value.problems
    assert "robots.targets[0].platform: 'slack' is not one of dingtalk, feishu" in problems
    assert "robots.targets[1].colour: unknown key" in problems
    assert "robots.targets[1]: give exactly one of webhook, webhook_file, token, token_file" in problems
    assert "robots.targets[2].mention.mobiles: Feishu robots mention by open_id; use user_ids" in problems
    assert any(p.startswith("robots.targets[3].templates.title: unknown field(s) nope") for p in problems)
    assert "robots.targets[5].name: duplicate target name 'd'" in problems


def test_problems_never_quote_the_webhook_that_carries_the_token():
    with pytest.raises(RobotConfigError) as caught:
        parse_robots({"targets": [{"name": "a", "platform": "dingtalk", "webhook": "ftp://host/?access_token=SEKRIT"}]})
    assert "SEKRIT" not in str(caught.value)
