"""The `idempotency:` config section: how long and how much the sidecar's exactly-once store keeps.

Owns the settings and their parsing only (kept apart so config.py can import it without the store's machinery).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.configtree import Node


@dataclass(frozen=True, slots=True)
class OnceSettings:
    ttl: float = 86400.0               # a key is remembered this long after its answer (the draft's expiry policy)
    max_entries: int = 10_000          # memory bound of one process: the oldest answers go first
    max_bytes: int = 16 * 1024 * 1024  # ...and of the answers' bodies together


def parse_idempotency(node: Node) -> OnceSettings:
    """The `idempotency:` section; every key is optional."""
    d = OnceSettings()
    settings = OnceSettings(
        ttl=node.seconds("ttl", d.ttl),
        max_entries=int(node.number("max_entries", d.max_entries, minimum=1)),
        max_bytes=node.bytes("max_bytes", d.max_bytes),
    )
    node.finish()
    if settings.ttl <= 0:
        node.problem("must be longer than 0", "ttl")
    return settings
