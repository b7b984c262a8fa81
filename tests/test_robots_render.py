import json

import pytest

from proxy.robots.errors import BadMessage
from proxy.robots.platforms import PLATFORMS, encode
from proxy.robots.render import parse_notification, render
from zoneinfo import ZoneInfo

from proxy.robots.settings import Mentions, RobotTarget, Templates
from proxy.secret import Secret


def alert(name="HighErrorRate", status="firing", **extra):
    return {"status": status, "labels": {"alertname": name, "severity": "critical", "job": "api"},
            "annotations": {"summary": f"{name} is over 5%"}, "startsAt": "2024-05-01T10:00:00.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph?g0", "fingerprint": "abc", **extra}


def payload(*alerts, status="firing", **extra):
    return {"version": "4", "groupKey": "{}:{}", "status": status, "receiver": "chat", "groupLabels": {},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am", "alerts": list(alerts), **extra}


def target(platform="dingtalk", **kw):
    return RobotTarget("ops", platform, Secret("https://x"), **kw)


def test_a_firing_alert_becomes_dingtalk_markdown_with_its_facts_and_links():
    msg = render(parse_notification(payload(alert())), target())
    text = msg["markdown"]["text"]
    assert msg["msgtype"] == "markdown" and msg["markdown"]["title"] == "[FIRING:1] HighErrorRate"
    for fact in ("HighErrorRate", "critical", "HighErrorRate is over 5%", "job=api",
                 "2024-05-01 18:00:00 UTC+08:00", "[Source](http://prom/graph?g0)"):   # Asia/Shanghai by default
        assert fact in text


def test_dingtalk_mentions_are_written_into_the_text_as_well():
    mentions = Mentions(mobiles=("13800000000",), user_ids=("manager01",))
    msg = render(parse_notification(payload(alert())), target(mentions=mentions))
    assert msg["at"] == {"atMobiles": ["13800000000"], "atUserIds": ["manager01"], "isAtAll": False}
    assert "@13800000000" in msg["markdown"]["text"] and "@manager01" in msg["markdown"]["text"]


@pytest.mark.parametrize("status, colour", [("firing", "red"), ("resolved", "green")])
def test_feishu_card_is_red_when_firing_and_green_when_resolved(status, colour):
    msg = render(parse_notification(payload(alert(status=status), status=status)), target("feishu"))
    assert msg["msg_type"] == "interactive"
    assert msg["card"]["header"]["template"] == colour
    assert status.upper() in msg["card"]["header"]["title"]["content"]


def test_feishu_mentions_use_at_tags():
    msg = render(parse_notification(payload(alert())), target("feishu", mentions=Mentions(user_ids=("ou_1",),
                                                                                          all=True)))
    assert msg["card"]["elements"][-1] == {"tag": "markdown", "content": "<at id=ou_1></at> <at id=all></at>"}


def test_firing_alerts_come_before_resolved_ones_under_headings():
    msg = render(parse_notification(payload(alert("B", "resolved"), alert("A"))), target())
    text = msg["markdown"]["text"]
    assert text.index("**Firing (1)**") < text.index("**A**") < text.index("**Resolved (1)**") < text.index("**B**")


@pytest.mark.parametrize("platform", ["dingtalk", "feishu"])
def test_many_alerts_are_cut_to_fit_the_size_limit_with_a_count_of_the_rest(platform):
    alerts = [alert(f"Alert{i}", annotations={"summary": "x" * 900}) for i in range(60)]
    msg = render(parse_notification(payload(*alerts)), target(platform, secret=Secret("s")))
    size = len(encode(msg)) + 100  # + timestamp and sign
    assert size <= PLATFORMS[platform].max_bytes
    shown = json.dumps(msg, ensure_ascii=False)
    kept = sum(1 for i in range(60) if f"**Alert{i}**" in shown)
    assert 5 < kept < 60
    assert f"+{60 - kept} more" in shown


def test_one_huge_annotation_is_clipped_rather_than_dropped():
    msg = render(parse_notification(payload(alert(annotations={"summary": "y" * 50000}))), target())
    assert len(encode(msg)) < 20000 and "yyyy…" in msg["markdown"]["text"]


def test_grafana_extras_are_shown():
    grafana = payload(alert(silenceURL="http://g/silence", dashboardURL="http://g/d/1", panelURL="http://g/d/1?p=2",
                            valueString="[ var='B' value=12 ]"),
                      orgId=1, title="[FIRING:1] Latency (api)", state="alerting", message="m", truncatedAlerts=3)
    grafana["version"] = "1"
    msg = render(parse_notification(grafana), target())
    text = msg["markdown"]["text"]
    assert msg["markdown"]["title"] == "[FIRING:1] Latency (api)"
    for link in ("[Silence](http://g/silence)", "[Dashboard](http://g/d/1)", "[Panel](http://g/d/1?p=2)"):
        assert link in text
    assert "+3 more" in text  # the alerts Grafana itself left out


def test_templates_override_the_layout():
    templates = Templates(title="${alertname} is ${status}", alert="ALERT ${alertname} value ${value_string}")
    msg = render(parse_notification(payload(alert(valueString="42"))), target(templates=templates))
    assert msg["markdown"]["title"] == "HighErrorRate is firing"
    assert "ALERT HighErrorRate value 42" in msg["markdown"]["text"]


@pytest.mark.parametrize("bad", [[], {"alerts": []}, {"alerts": [{"status": "weird"}]},
                                 {"alerts": [{"status": "firing", "labels": ["a"]}]}])
def test_malformed_payloads_are_rejected(bad):
    with pytest.raises(BadMessage):
        parse_notification(bad)


@pytest.mark.parametrize("platform", ["dingtalk", "feishu"])
def test_a_resolved_alert_says_what_it_means_where_the_runbook_is_and_when_it_ended(platform):
    resolved = alert(status="resolved", endsAt="2024-05-01T11:05:30Z", annotations={
        "summary": "retries at 20%", "description": "The platform is failing; see retries by reason.",
        "runbook_url": "https://runbooks.example.com/imsidecar.md#imsidecarretryratiohigh"})
    shown = json.dumps(render(parse_notification(payload(resolved, status="resolved")), target(platform)),
                       ensure_ascii=False)
    for fact in ("retries at 20%", "The platform is failing; see retries by reason.",
                 "[Runbook](https://runbooks.example.com/imsidecar.md#imsidecarretryratiohigh)",
                 "Started: 2024-05-01 18:00:00 UTC+08:00", "Ended: 2024-05-01 19:05:30 UTC+08:00 (after 1h 5m)"):
        assert fact in shown, fact


def test_times_follow_the_targets_time_zone_and_templates_get_the_new_fields():
    templates = Templates(alert="${starts_at} / ${ends_at} / ${duration} / ${runbook_url}")
    resolved = alert(status="resolved", endsAt="2024-05-01T10:00:40Z", annotations={"runbook_url": "https://r#a"})
    msg = render(parse_notification(payload(resolved, status="resolved")),
                 target(timezone=ZoneInfo("UTC"), templates=templates))
    assert "2024-05-01 10:00:00 UTC+00:00 / 2024-05-01 10:00:40 UTC+00:00 / 40s / https://r#a" in msg["markdown"]["text"]


def test_a_description_that_only_repeats_the_summary_is_shown_once():
    same = alert(annotations={"description": "disk full"})   # no summary: the description stands in for it
    text = render(parse_notification(payload(same)), target())["markdown"]["text"]
    assert text.count("disk full") == 1
