"""The quota-saving config sections: defaults, loose units, and every problem named by its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.config import ConfigError
from proxy.saving.settings import CachedRoute, CacheSettings
from tests.saving_support import app_config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.loads(text, env={})
    return caught.value.problems


def test_defaults_coalesce_and_merge_cards_but_cache_and_refuse_nothing() -> None:
    app = app_config()
    assert app.cache == CacheSettings() and not app.cache.enabled
    assert app.coalesce.enabled and app.cards.enabled and app.cards.interval == 0.5
    assert app.priority.default == "interactive" and app.priority.max_bulk_wait == 5.0
    assert app.quota.account == "bot" and app.quota.allowance is None and app.quota.threshold is None


def test_a_cache_section_turns_the_curated_routes_on_and_adds_its_own() -> None:
    app = app_config(sections="cache: {routes: {/open-apis/im/v1/chats/:chat_id: 5m, "
                              "/open-apis/contact/v3/users/batch_get_id: {ttl: 30s, post: true}, "
                              "/open-apis/bot/v3/info: 0}, stale_if_error: 1h, max_bytes: 1MiB}")
    assert app.cache.enabled and app.cache.defaults
    assert app.cache.routes == {"/open-apis/im/v1/chats/:chat_id": CachedRoute(300.0),
                                "/open-apis/contact/v3/users/batch_get_id": CachedRoute(30.0, post=True),
                                "/open-apis/bot/v3/info": CachedRoute(0.0)}
    assert app.cache.stale_if_error == 3600.0 and app.cache.max_bytes == 1024 * 1024


def test_quota_reserve_as_calls_or_a_share(tmp_path: Path) -> None:
    app = app_config(sections=f"quota: {{account: acme, allowance: 10000, reserve: 10%, refuse_bulk: true, "
                              f"state_dir: {tmp_path}}}")
    assert (app.quota.account, app.quota.allowance, app.quota.reserve, app.quota.threshold) == ("acme", 10000, 1000, 9000)
    assert app_config(sections="quota: {allowance: 5000, reserve: 200}").quota.reserve == 200


@pytest.mark.parametrize("sections, expected", [
    ("cache: {ttl: 5m}", "apps[0].cache.ttl: unknown key"),
    ("cache: {routes: {contact/v3/users: 60s}}", "apps[0].cache.routes.contact/v3/users: a route template starts with /"),
    ("cache: {routes: {/a: soon}}", "apps[0].cache.routes./a: expected a duration"),
    ("cache: {routes: {/a: {ttl: 1s, postt: true}}}", "apps[0].cache.routes./a.postt: unknown key"),
    ("cards: {interval: 0}", "apps[0].cards.interval: must be longer than 0"),
    ("priority: {default: urgent}", "apps[0].priority.default: 'urgent' is not one of interactive, bulk"),
    ("priority: {routes: {/open-apis/im/v1/messages: later}}",
     "apps[0].priority.routes./open-apis/im/v1/messages: 'later' is not one of"),
    ("priority: {bulk_share: 0}", "apps[0].priority.bulk_share: expected a share in (0, 1]"),
    ("quota: {allowance: 1.5}", "apps[0].quota.allowance: expected a whole number"),
    ("quota: {allowance: 100, reserve: 100}", "apps[0].quota.reserve: must be less than the allowance"),
    ("quota: {reserve: 10%}", "apps[0].quota.reserve: '10%': a share needs an allowance"),
    ("quota: {refuse_bulk: true}", "apps[0].quota.refuse_bulk: refusing bulk calls needs an allowance"),
    ("quota: {account: Acme}", "apps[0].quota.account: 'Acme' must match"),
    ("quota: {state_dir: /no/such/dir}", "apps[0].quota.state_dir: /no/such/dir is not a directory"),
    ("coalesce: {enable: false}", "apps[0].coalesce.enable: unknown key"),
])
def test_each_problem_is_named_by_its_path(sections: str, expected: str) -> None:
    found = problems(f"apps: [{{name: a, platform: feishu, app_id: i, app_secret: s, {sections}}}]")
    assert any(p.startswith(expected) for p in found), found


def test_apps_sharing_an_account_must_agree_on_it() -> None:
    found = problems("""
apps:
  - {name: a, platform: feishu, app_id: i, app_secret: s, quota: {account: acme, allowance: 10000}}
  - {name: b, platform: feishu, app_id: j, app_secret: s, quota: {account: acme, allowance: 20000}}
""")
    assert found == ["apps[1].quota: account 'acme' is set differently at apps[0].quota: apps sharing an account "
                     "must give it the same allowance, reserve, refuse_bulk and state_dir"]
    agreed = config.loads("""
apps:
  - {name: a, platform: feishu, app_id: i, app_secret: s, quota: {account: acme, allowance: 10000}}
  - {name: b, platform: feishu, app_id: j, app_secret: s, quota: {account: acme, allowance: 10000}}
""", env={})
    assert {app.quota.account for app in agreed.apps} == {"acme"}
