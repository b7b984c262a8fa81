from typing import Any

from proxy.configtree import Node, expand
from proxy.robots.settings import Mentions, RobotsSettings, parse_robots
from proxy.secret import Secret


def parse(raw: Any, problems: list[str] | None = None) -> tuple[RobotsSettings | None, list[str]]:
    problems = [] if problems is None else problems
    return parse_robots(Node(raw, "robots", problems)), problems


def test_token_and_base_url_build_the_webhook_and_secrets_stay_masked(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("SECabc\n")
    settings, problems = parse({
        "deadline": "10s",
        "targets": [
            {"name": "ops", "platform": "dingtalk", "token": "tok123", "secret_file": str(secret_file),
             "keyword": "alert", "mention": {"mobiles": ["13800000000"], "all": False}},
            {"name": "dev", "platform": "feishu", "webhook": "https://open.larksuite.com/open-apis/bot/v2/hook/hook-token-xyz",
             "mention": {"user_ids": ["ou_1"]}},
        ],
    })
    assert problems == [] and settings is not None
    ops, dev = settings.targets["ops"], settings.targets["dev"]
    assert settings.deadline == 10.0
    assert ops.webhook.reveal() == "https://oapi.dingtalk.com/robot/send?access_token=tok123"
    assert ops.secret == Secret("SECabc")
    assert ops.mentions == Mentions(mobiles=("13800000000",))
    assert dev.webhook.reveal().endswith("/hook/hook-token-xyz") and dev.secret is None
    shown = repr(settings)
    assert "tok123" not in shown and "SECabc" not in shown and "hook-token-xyz" not in shown


def test_every_problem_is_named_by_its_path():
    settings, problems = parse({"targets": [
        {"name": "a", "platform": "slack", "token": "t"},
        {"name": "b", "platform": "feishu", "token": "t", "webhook": "https://x/y", "colour": "red"},
        {"name": "c", "platform": "feishu", "token": "t", "mention": {"mobiles": ["1"]}},
        {"name": "d", "platform": "dingtalk", "token": "t", "templates": {"title": "${nope} ${status}"}},
        {"name": "d", "platform": "dingtalk", "token": "t"},
        {"name": "d", "platform": "dingtalk", "token": "t"},
    ]})
    assert settings is None
    assert "robots.targets[0].platform: 'slack' is not one of dingtalk, feishu, lark" in problems
    assert "robots.targets[1].colour: unknown key" in problems
    assert "robots.targets[1]: give exactly one of webhook, webhook_file, token, token_file" in problems
    assert "robots.targets[2].mention.mobiles: Feishu robots mention by open_id; use user_ids" in problems
    assert any(p.startswith("robots.targets[3].templates.title: unknown field(s) nope") for p in problems)
    assert "robots.targets[5].name: duplicate target name 'd'" in problems


def test_problems_never_quote_the_webhook_that_carries_the_token():
    settings, problems = parse({"targets": [
        {"name": "a", "platform": "dingtalk", "webhook": "ftp://host/?access_token=SEKRIT"},
    ]})
    assert settings is None
    assert problems == ["robots.targets[0]: the webhook is not an http(s) URL"]


def test_a_secret_given_both_inline_and_as_a_file_is_one_problem_not_three(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    _, problems = parse({"targets": [
        {"name": "a", "platform": "dingtalk", "token": "t", "secret": "s", "secret_file": str(token_file)},
    ]})
    assert problems == ["robots.targets[0]: give secret or secret_file, not both"]


def test_optional_values_that_are_given_must_still_be_sound():
    _, problems = parse({"deadline": 0, "targets": [
        {"name": "a", "platform": "dingtalk", "token": "t", "secret": "", "mention": {"mobiles": [True]}},
        {"name": "b", "platform": "dingtalk", "webhook": "https://oapi.dingtalk.com/robot/send?access_token=t",
         "base_url": "https://example.test"},
    ]})
    assert problems == [
        "robots.deadline: must be more than zero",
        "robots.targets[0].secret: is empty",
        "robots.targets[0].mention.mobiles: expected a list of strings",
        "robots.targets[1].base_url: only used with token; put the host in webhook instead",
    ]


def test_an_unset_variable_is_reported_once_and_its_target_is_not_silently_dropped():
    problems: list[str] = []
    raw = expand({"targets": [{"name": "a", "platform": "dingtalk", "token": "${DT_TOKEN}"}]}, {}, "robots", problems)
    settings, problems = parse(raw, problems)
    assert settings is None
    assert problems == ["robots.targets[0].token: ${DT_TOKEN} is not set"]


def test_problems_elsewhere_in_the_shared_list_do_not_spoil_a_sound_section():
    settings, problems = parse({"targets": [{"name": "a", "platform": "feishu", "token": "t"}]},
                               ["apps[0].name: is required"])
    assert settings is not None and set(settings.targets) == {"a"}
    assert problems == ["apps[0].name: is required"]


def test_alert_times_default_to_asia_shanghai_and_follow_the_section_then_the_target():
    settings, problems = parse({"timezone": "Europe/Berlin", "targets": [
        {"name": "ops", "platform": "dingtalk", "token": "t"},
        {"name": "dev", "platform": "feishu", "token": "t", "timezone": "UTC"}]})
    assert problems == [] and settings is not None
    assert str(settings.targets["ops"].timezone) == "Europe/Berlin" and str(settings.targets["dev"].timezone) == "UTC"
    default, _ = parse({"targets": [{"name": "ops", "platform": "dingtalk", "token": "t"}]})
    assert default is not None and str(default.targets["ops"].timezone) == "Asia/Shanghai"


def test_an_unknown_time_zone_is_named_by_its_path():
    _, problems = parse({"targets": [{"name": "ops", "platform": "dingtalk", "token": "t", "timezone": "Mars/Base"}]})
    assert problems == ["robots.targets[0].timezone: unknown time zone 'Mars/Base'; use an IANA name such as "
                        "Asia/Shanghai"]
