"""Outbound connections: the `egress:` settings, and how every outbound aiohttp session of the sidecar is made.

Owns the forward proxy (configured, with credentials from a file or the environment, or HTTPS_PROXY/HTTP_PROXY/
NO_PROXY read once at start-up), the per-destination choice between that proxy and a direct connection, and the
TLS trust of outbound connections; it does not decide what is sent or where (upstream, robots and events do).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from yarl import URL

from proxy.configtree import Node
from proxy.secret import Secret

# What stays direct when `no_proxy` is not given: the pod's own loopback (a local gateway, the application).
DEFAULT_NO_PROXY = ("localhost", "127.0.0.1", "::1")
DOMAIN = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
SECURE_SCHEMES = frozenset({"https", "wss"})
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One forward proxy: its URL (never with credentials in it) and the Basic credentials it wants, if any."""

    url: str
    username: str = ""
    password: Secret | None = None

    def authorization(self) -> str | None:
        if not self.username and self.password is None:
            return None
        password = self.password.reveal() if self.password is not None else ""
        return "Basic " + base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")   # RFC 7617


@dataclass(frozen=True, slots=True)
class EgressSettings:
    """`https` carries https:// and wss:// destinations, `http` carries http:// and ws:// ones (None: direct)."""

    https: ProxyRoute | None = None
    http: ProxyRoute | None = None
    no_proxy: tuple[str, ...] = DEFAULT_NO_PROXY
    source: str = "off"          # off | config (egress.proxy) | env (egress.trust_env)
    ca_file: str | None = None   # trusted beside the system's CAs: a TLS-inspecting proxy, a private gateway

    @property
    def proxied(self) -> bool:
        return self.https is not None or self.http is not None


# ----------------------------------------------------------------------------------------------------------------
# Which destinations bypass the proxy


@dataclass(frozen=True, slots=True)
class _Rule:
    """One `no_proxy` entry: a domain with its subdomains (a leading `.` or `*.` changes nothing, as in curl and
    Python), an IP network, or `*`; each on one port only when it names one."""

    domain: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return _in_network(host, self.network)
        assert self.domain is not None
        if self.domain == "*":
            return True
        return host == self.domain or host.endswith("." + self.domain)


def _in_network(host: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False


def parse_rule(entry: str) -> _Rule:
    """`example.com`, `.example.com`, `10.0.0.0/8`, `::1`, `host:8443`, `[fd00::1]:8443` or `*`; ValueError if not."""
    host, port = _split_port(entry.strip().lower())
    try:
        return _Rule(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    domain = host if host == "*" else host.removeprefix("*").removeprefix(".")
    if domain != "*" and not DOMAIN.fullmatch(domain):
        raise ValueError(f"{entry!r} is not a domain, host, IP network or *")
    return _Rule(domain=domain, port=port)


def _split_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, None


# ----------------------------------------------------------------------------------------------------------------
# Sessions


class Egress:
    """Makes the sidecar's outbound sessions. With a proxy, a client middleware picks, per request, the proxy or a
    direct connection; without one, the sessions are plain (nothing runs per request)."""

    def __init__(self, settings: EgressSettings, *, direct: Iterable[str] = (),
                 resolver: AbstractResolver | None = None) -> None:
        """`direct`: URLs whose origins never go through the proxy (the application's own endpoints);
        `resolver`: name resolution for every session (tests point platform domains at local fakes)."""
        self.settings = settings
        self._rules = tuple(parse_rule(entry) for entry in settings.no_proxy)
        self._direct = frozenset(origin for origin in map(_origin, direct) if origin is not None)
        self._resolver = resolver
        self._tls = _tls_context(settings.ca_file)
        self._routes: dict[tuple[str, str, int], ProxyRoute | None] = {}

    def route(self, url: URL) -> ProxyRoute | None:
        """The proxy a request to `url` goes through, or None for a direct connection."""
        key = (url.scheme, (url.host or "").lower(), url.port or DEFAULT_PORTS.get(url.scheme, 0))
        if key not in self._routes:
            self._routes[key] = self._choose(*key)
        return self._routes[key]

    def _choose(self, scheme: str, host: str, port: int) -> ProxyRoute | None:
        proxy = self.settings.https if scheme in SECURE_SCHEMES else self.settings.http
        if proxy is None or (host, port) in self._direct:
            return None
        if any(rule.matches(host.strip("[]"), port) for rule in self._rules):
            return None
        return proxy

    def session(self, *, limit: int = 100, keepalive_timeout: float = 15.0, ttl_dns_cache: int | None = 10,
                connector_class: Callable[..., aiohttp.TCPConnector] = aiohttp.TCPConnector,
                **options: Any) -> aiohttp.ClientSession:
        """A session whose every connection follows these settings; `options` are ClientSession's own."""
        connector = connector_class(limit=limit, keepalive_timeout=keepalive_timeout, ttl_dns_cache=ttl_dns_cache,
                                    ssl=self._tls or True, resolver=self._resolver)
        middlewares = (self._through_proxy,) if self.settings.proxied else ()
        return aiohttp.ClientSession(connector=connector, middlewares=middlewares, trust_env=False, **options)

    async def _through_proxy(self, request: aiohttp.ClientRequest,
                             handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        route = self.route(request.url)
        if route is not None and request.proxy is None:
            request.update_proxy(URL(route.url), None, _proxy_headers(request, route))
        return await handler(request)


def _proxy_headers(request: aiohttp.ClientRequest, route: ProxyRoute) -> CIMultiDict[str] | None:
    """Proxy-Authorization goes on the CONNECT for a tunnel (https, wss), on the request itself otherwise."""
    authorization = route.authorization()
    if authorization is None:
        return None
    if request.is_ssl():
        return CIMultiDict({"Proxy-Authorization": authorization})
    request.headers["Proxy-Authorization"] = authorization
    return None


def _origin(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    return parts.hostname.lower(), parts.port or DEFAULT_PORTS.get(parts.scheme, 0)


def _tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_file)
    return context


# ----------------------------------------------------------------------------------------------------------------
# The `egress:` section


Report = Callable[[str], None]   # records one config problem at the right path


def parse_egress(node: Node, env: Mapping[str, str]) -> EgressSettings:
    """`egress: {proxy, username, password | password_file, no_proxy, ca_file}` or `egress: {trust_env: true, ...}`."""
    trust_env = node.flag("trust_env", False)
    if trust_env and node.has("proxy"):
        node.problem("give proxy or trust_env: true, not both")
    route = _configured_route(node) if node.has("proxy") else None
    ca_file = _ca_file(node)
    listed = node.strings("no_proxy") if node.has("no_proxy") else None
    no_proxy = _no_proxy(lambda message: node.problem(message, "no_proxy"), listed)
    node.finish()
    if trust_env:
        return _from_env(node, env, ca_file, no_proxy if listed is not None else None)
    return EgressSettings(route, route, no_proxy, "config" if route else "off", ca_file)


def _configured_route(node: Node) -> ProxyRoute | None:
    url = _proxy_url(lambda message: node.problem(message, "proxy"), node.text("proxy", required=True) or "")
    username = node.text("username", "") or ""
    password = node.secret("password", required=False)
    if password is not None and not username:
        node.problem("a proxy password needs a username", "username")
    return ProxyRoute(url, username, password) if url else None


def _proxy_url(report: Report, text: str) -> str:
    """An http(s)://host[:port] URL. Never echoed in a problem: it may carry a password."""
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        report("credentials do not belong in the URL: use egress.username and egress.password or password_file")
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        report("expected http://host:port or https://host:port")
        return ""
    return f"{parts.scheme}://{parts.netloc}"


def _no_proxy(report: Report, entries: tuple[str, ...] | None) -> tuple[str, ...]:
    if entries is None:
        return DEFAULT_NO_PROXY
    for entry in entries:
        try:
            parse_rule(entry)
        except ValueError as exc:
            report(str(exc))
    return entries


def _ca_file(node: Node) -> str | None:
    path = node.text("ca_file")
    if path is None:
        return None
    try:
        _tls_context(path)
    except (OSError, ssl.SSLError) as exc:
        node.problem(f"cannot load {path}: {getattr(exc, 'strerror', None) or exc}", "ca_file")
        return None
    return path


def _from_env(node: Node, env: Mapping[str, str], ca_file: str | None,
              no_proxy: tuple[str, ...] | None) -> EgressSettings:
    """The environment as curl and Go read it (lower-case names first; HTTPS_PROXY for https and wss); a
    `no_proxy` list in the config wins over NO_PROXY."""
    def report(name: str) -> Report:
        return lambda message: node.problem(f"{name}: {message}", "trust_env")

    https = _env_route(report("HTTPS_PROXY"), _env(env, "https_proxy"))
    http = _env_route(report("HTTP_PROXY"), _env(env, "http_proxy"))
    if no_proxy is None:
        listed = _env(env, "no_proxy")
        entries = tuple(e.strip() for e in listed.split(",") if e.strip()) if listed is not None else None
        no_proxy = _no_proxy(report("NO_PROXY"), entries)
    return EgressSettings(https, http, no_proxy, "env", ca_file)


def _env(env: Mapping[str, str], name: str) -> str | None:
    for key in (name, name.upper()):
        if env.get(key):
            return env[key]
    return None


def _env_route(report: Report, value: str | None) -> ProxyRoute | None:
    """HTTPS_PROXY may carry `user:password@` (curl's convention): taken out of the URL into the credentials."""
    if value is None:
        return None
    parts = urlsplit(value if "://" in value else f"http://{value}")
    url = _proxy_url(report, parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
    if not url:
        return None
    password = Secret(unquote(parts.password)) if parts.password else None
    return ProxyRoute(url, unquote(parts.username or ""), password)


__all__ = ["DEFAULT_NO_PROXY", "Egress", "EgressSettings", "ProxyRoute", "parse_egress", "parse_rule"]
