"""The store section and the one-pod store: problems named by path, passwords never printed, GCRA in virtual time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy import config
from proxy.cli import main
from proxy.clock import VirtualClock, settle
from proxy.config import ConfigError
from proxy.platforms.base import TokenGrant
from proxy.store import (
    LocalQuota,
    LocalTokens,
    MemoryStore,
    SharedQuotaExceeded,
    StoreSettings,
    gcra,
    masked_url,
)

APP = """
listen: 127.0.0.1:8080
apps:
  - {name: ops-ding, platform: dingtalk, app_key: ding_a, app_secret: ding-secret-value-123456}
"""
URL_PASSWORD = "s3cret-redis-pass-4711"


def load(store: str, env: dict[str, str] | None = None) -> config.Config:
    return config.loads(APP + store, env=env or {})


def problems(store: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(store, env)
    return caught.value.problems


def test_without_a_store_section_nothing_is_shared() -> None:
    assert load("").store == StoreSettings(backend="memory")
    assert not load("store: {backend: memory}").store.shared


def test_redis_with_the_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(URL_PASSWORD + "\n")
    store = load(f"store: {{backend: redis, url: 'redis://redis.infra:6379/2', password_file: {secret}, "
                 f"replicas: 4, timeout: 200ms}}").store
    assert store.shared and store.url == "redis://redis.infra:6379/2"
    assert store.password is not None and store.password.reveal() == URL_PASSWORD
    assert store.fallback_share == 0.25          # 1/replicas: together the replicas stay within the quota
    assert store.timeout == 0.2 and store.key_prefix == "imsidecar:" and store.tls is None


def test_a_password_in_the_url_is_moved_out_of_it_and_never_printed() -> None:
    store = load(f"store: {{backend: redis, url: 'rediss://app:{URL_PASSWORD}@redis.infra:6380/0'}}").store
    assert store.password is not None and store.password.reveal() == URL_PASSWORD
    assert store.url == "rediss://app@redis.infra:6380/0"
    assert store.display_url == "rediss://app:****@redis.infra:6380/0"
    assert store.tls is not None and store.tls.verify      # rediss:// means TLS, verified by default
    assert URL_PASSWORD not in repr(store) and URL_PASSWORD not in str(load("store: {backend: redis, url: "
                                                                              f"'redis://:{URL_PASSWORD}@h:1'}}"))


def test_a_bad_url_is_named_by_path_with_its_password_masked() -> None:
    found = problems(f"store: {{backend: redis, url: 'http://:{URL_PASSWORD}@redis.infra:6379'}}")
    assert found == [("store.url: 'http://:****@redis.infra:6379' is not a redis:// or rediss:// URL with a host "
                      "(and a port 1-65535)")]
    assert URL_PASSWORD not in "".join(found)


def test_every_problem_is_named_by_its_path(tmp_path: Path) -> None:
    found = problems("""
store:
  backend: redis
  url: redis://localhost:6379/cache
  password: ${REDIS_PASSWORD}
  fallback_share: 1.5
  replicas: 0
  lock_ttl: soon
  tls: {ca_file: /nonexistent/ca.pem, verfy: false}
  key_prefix: ""
  probe_interval: 0s
""")
    assert set(found) == {
        "store.password: ${REDIS_PASSWORD} is not set",
        "store.url: 'redis://localhost:6379/cache': the path must be a database number, like /0",
        "store.fallback_share: expected a share in (0, 1], got 1.5",
        "store.replicas: expected a number ≥ 1, got 0",
        "store.lock_ttl: expected a duration like 250ms, 2s or 5m, got 'soon'",
        "store.tls.verfy: unknown key",
        "store.tls.ca_file: cannot read /nonexistent/ca.pem",
        "store.tls: tls options need a rediss:// url",
        "store.key_prefix: must not be empty: other programs may share this Redis",
        "store.probe_interval: must be longer than 0",
    }


def test_redis_keys_are_refused_with_the_memory_backend() -> None:
    assert problems("store: {url: 'redis://localhost:6379/0', colour: blue}") == [
        "store.url: only with backend: redis", "store.colour: unknown key"]
    assert problems("store: {backend: etcd}") == ["store.backend: 'etcd' is not one of memory, redis"]


def test_two_passwords_are_one_too_many() -> None:
    found = problems(f"store: {{backend: redis, url: 'redis://:{URL_PASSWORD}@h:6379', password: other-password}}")
    assert found == [("store.password: the url already carries a password; give it in one place only "
                      "(password_file is best)")]


def test_masked_url_leaves_urls_without_password_alone() -> None:
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"
    assert masked_url("redis://h:6379/0", has_password=True) == "redis://:****@h:6379/0"


# ---------------------------------------------------------------------------------------------------------------
# One pod


async def test_memory_store_passes_fetches_through_and_never_waits() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock)
    calls = []

    async def fetch() -> TokenGrant:
        calls.append(1)
        return TokenGrant("t-1", 7200)

    grant = await store.tokens.get_or_fetch("app", "tenant", fetch, 600)
    assert (grant.value, grant.expires_at) == ("t-1", clock.wall() + 7200) and len(calls) == 1
    assert "t-1" not in repr(grant)
    assert await store.quota.acquire("app:/x", 20, 1, deadline=clock.now()) == 0.0
    assert isinstance(store.tokens, LocalTokens)


def test_gcra_spaces_slots_by_the_interval_after_the_burst() -> None:
    tat, waits = None, []
    for _ in range(5):
        wait, tat = gcra(tat, 100.0, 0.05, burst=3)
        waits.append(round(wait, 6))
    assert waits == [0.0, 0.0, 0.0, 0.05, 0.1]


async def test_local_quota_at_a_share_paces_and_refuses_past_the_deadline() -> None:
    clock = VirtualClock()
    quota = LocalQuota(clock, share=0.25)                 # 20/s shared by four replicas: 5/s here
    key, sent = "ops-ding:/topapi/v2/user/get", []

    async def send() -> None:
        await quota.acquire(key, 20, 1, deadline=clock.now() + 0.5)
        sent.append(clock.now())

    tasks = [asyncio.create_task(send()) for _ in range(3)]
    await settle()
    with pytest.raises(SharedQuotaExceeded) as caught:   # the fourth slot, at 0.6 s, is after its deadline
        await quota.acquire(key, 20, 1, deadline=clock.now() + 0.5)
    assert caught.value.retry_after == pytest.approx(0.6)
    await clock.advance(1.0)
    await asyncio.gather(*tasks)
    assert sent == [0.0, 0.2, 0.4]


def test_check_config_shows_the_store_without_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "imsidecar.yaml"
    path.write_text(APP + f"store: {{backend: redis, url: 'redis://:{URL_PASSWORD}@redis.infra:6379/0', replicas: 4}}")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "store redis redis://:****@redis.infra:6379/0 (tls off, fallback share 25%)" in out
    assert URL_PASSWORD not in out
