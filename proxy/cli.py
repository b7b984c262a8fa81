"""The `imsidecar` command: `run --config`, `check-config`, `demo`, `events dead-letters|replay`.

Owns argument parsing, exit codes and what is printed; it builds nothing itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from typing import Sequence

from urllib.parse import urlsplit

from proxy import __version__, config
from proxy.config import Address, AppConfig, Config
from proxy.egress import EgressSettings, ProxyRoute
from proxy.events.settings import EventApp, EventsSettings, Mode
from proxy.robots.settings import RobotsSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imsidecar", description="Local proxy for the Feishu/Lark and DingTalk open APIs.")
    parser.add_argument("--version", action="version", version=f"imsidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the sidecar")
    run.add_argument("--config", "-c", required=True, help="path of the YAML config")
    check = commands.add_parser("check-config", help="validate a config and print its summary, secrets masked")
    check.add_argument("path")
    demo = commands.add_parser("demo", help="run against simulated Feishu and DingTalk, no credentials needed")
    demo.add_argument("--listen", default="127.0.0.1:8080")
    demo.add_argument("--admin-listen", default="127.0.0.1:9464")
    demo.add_argument("--faults", nargs="?", const=0.2, type=fault_share, default=0.0, metavar="SHARE",
                      help="make this share of platform calls fail in mixed ways: 0.05 or 5%% (0.2 when bare)")
    add_events_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "events":
        return events_command(args)
    if args.command == "run":
        gc.disable()   # loading and building make only long-lived objects: nothing for the collector to find
        loaded = load_or_report(args.config)   # until the build is frozen (freeze_built_objects enables it again)
        return 2 if loaded is None else serve(loaded)
    from proxy.demo import run_demo
    install_fast_loop()   # the demo runs on what `run` runs on
    return run_demo(args.listen, args.admin_listen, args.faults)


def fault_share(text: str) -> float:
    """`--faults 0.05` or `--faults 5%`; a bare `5` is refused rather than read as 500%."""
    percent = text.strip().endswith("%")
    try:
        share = float(text.strip().removesuffix("%")) / (100 if percent else 1)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (0.05) or a percentage (5%)")
    return share


def load_or_report(path: str) -> Config | None:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"imsidecar: config: {problem}", file=sys.stderr)
        return None


def check_config(path: str) -> int:
    loaded = load_or_report(path)
    if loaded is None:
        return 2
    print(summary(loaded))
    return 0


def summary(c: Config) -> str:
    """What the config means, one line per thing the sidecar will do; no character of any secret."""
    lines = [f"listen {c.listen}, admin {c.admin_listen}, deadline {c.limits.deadline:g}s",
             readiness_line(c), egress_line(c.egress)]
    for app in c.apps:
        lines += app_lines(app)
    if c.store.shared:   # the URL never holds the password; display_url shows that there is one
        lines.append(f"store redis {c.store.display_url} (tls {'on' if c.store.tls else 'off'}, "
                     f"fallback share {c.store.fallback_share:.0%})")
    if c.robots is not None:
        lines += robot_lines(c.robots, c.listen)
    if c.events is not None:
        lines += event_lines(c.events)
    return "\n".join(lines)


def readiness_line(c: Config) -> str:
    gate = "; then waits for every app's first token (readiness.wait_for_tokens)" if c.readiness.wait_for_tokens else ""
    return f"ready once listening and each app's first token attempt is made{gate}"


def egress_line(egress: EgressSettings) -> str:
    if not egress.proxied:
        return "egress direct" + (" (trust_env: no proxy variable set)" if egress.source == "env" else "")
    via = {"https/wss": egress.https, "http/ws": egress.http}
    routes = ", ".join(f"{kind} via {route_text(route)}" if route else f"{kind} direct" for kind, route in via.items())
    extra = f"; trusts {egress.ca_file}" if egress.ca_file else ""
    return f"egress {routes}; direct: {', '.join(egress.no_proxy) or 'nothing'}{extra}"


def route_text(route: ProxyRoute) -> str:
    return route.url + (f" as {route.username} (password ****)" if route.username else "")


def app_lines(app: AppConfig) -> list[str]:
    lines = [f"app {app.name} ({app.platform}) id={app.client_id} secret={app.client_secret.masked()} "
             f"token={app.token_kind}"]
    for e in app.expose:
        lines.append(f"  http://{e.listen}{e.prefix or ''}/... -> {app.upstreams[e.upstream].base_url}")
    return lines


def robot_lines(robots: RobotsSettings, listen: Address) -> list[str]:
    lines = [f"robots on http://{listen}/robots/<name> and /alerts/<name>, deadline {robots.deadline:g}s"]
    for target in robots.targets.values():
        signed = "signed" if target.secret is not None else "unsigned"
        keyword = f", keyword {target.keyword!r}" if target.keyword else ""
        lines.append(f"  robot {target.name} ({target.platform}) -> {origin(target.webhook.reveal())}/**** "
                     f"({signed}{keyword})")   # the path or query holds the robot's token
    return lines


def event_lines(events: EventsSettings) -> list[str]:
    lines = [f"events callbacks on http://{events.listen}" if events.listen else "events (outbound only)"]
    for app in events.apps:
        source = f"callback {app.callback_path}" if app.mode is Mode.HTTP else f"stream from {stream_origin(app)}"
        lines.append(f"  events {app.name} ({app.platform.value}) {source} -> {app.delivery.url}")
    return lines


def stream_origin(app: EventApp) -> str:
    return app.feishu.domain if app.feishu is not None else app.dingtalk.api if app.dingtalk is not None else "?"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def serve(loaded: Config) -> int:
    """Run until SIGTERM/SIGINT: exit 0 after the drain, or 2 with one line when the sidecar cannot start."""
    from proxy.app import StartupError
    from proxy.logs import configure

    configure(loaded.logging)
    install_fast_loop()
    try:
        asyncio.run(run(loaded))
    except StartupError as exc:
        print(f"imsidecar: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


async def run(loaded: Config) -> None:
    from proxy.app import Sidecar, StartupError, describe_start_failure

    try:
        sidecar = Sidecar(loaded)
    except Exception as exc:
        raise StartupError(describe_start_failure(exc)) from exc
    freeze_built_objects()
    await sidecar.run_until_signal()


def add_events_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    events = commands.add_parser("events", help="list and replay the events given up on (dead letters)")
    actions = events.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("dead-letters", help="list dead letters, oldest first (never their bodies)")
    listing.add_argument("--app", help="only this events app (default: every one)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many per app (default 100)")
    again = actions.add_parser("replay", help="queue dead letters again, at the tail, as if just received")
    again.add_argument("--app", required=True)
    again.add_argument("--all", action="store_true", help="every dead letter of the app")
    again.add_argument("ids", nargs="*", metavar="ID", help="the ids `dead-letters` printed")
    for action in (listing, again):
        action.add_argument("--config", "-c", required=True, help="path of the sidecar's YAML config")


def events_command(args: argparse.Namespace) -> int:
    """`imsidecar events ...`: 0 done, 1 the store could not be used, 2 a config or argument problem."""
    from proxy.events.operator import OperatorError, list_dead_letters, replay

    loaded = load_or_report(args.config)
    apps = _events_apps(loaded, args)
    if loaded is None or loaded.events is None or apps is None:
        return 2
    try:
        if args.action == "dead-letters":
            print(asyncio.run(list_dead_letters(loaded.events, loaded.store, apps, args.limit)))
        else:
            print(asyncio.run(replay(loaded.events, loaded.store, args.app, None if args.all else args.ids)))
    except OperatorError as exc:
        print(f"imsidecar: events: {exc}", file=sys.stderr)
        return 1
    return 0


def _events_apps(loaded: Config | None, args: argparse.Namespace) -> list[str] | None:
    """The events apps the command is about; None (after saying why) when the arguments do not fit the config."""
    if loaded is None:
        return None
    names = [app.name for app in loaded.events.apps] if loaded.events else []
    problem = ""
    if args.app and args.app not in names:
        problem = f"no events app {args.app!r} in {args.config} (there are: {', '.join(names) or 'none'})"
    elif args.action == "replay" and args.all == bool(args.ids):
        problem = "replay needs --all or the ids to queue again, not both"
    if problem:
        print(f"imsidecar: events: {problem}", file=sys.stderr)
        return None
    return [args.app] if args.app else names


def install_fast_loop() -> None:
    """uvloop when installed (the image and `pip install 'imsidecar[fast]'` have it); /healthz says which runs."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# The cyclic collector's thresholds (CPython's are 700, 10, 10). A young collection scans every tracked object made
# since the last one and still alive, and it comes when that count has grown by the first threshold: with many
# requests in flight their own objects are that count, so at 2,000 the collector ran ~90 times a second at 512
# connections, scanning in-flight requests again and again (1.2 s of 5 s of CPU; 1.8 s at 4,096) and finding no
# garbage at all. The sidecar's request paths make none: answered, failed at the platform, cut off by a client that
# gave up, one connection per request (tests/test_pipeline.py holds it to that). At 100,000 a young collection is
# rare below ~1,000 requests in flight (none in 5 s at 512 connections; at 4,096 a few of ~0.1 s each), and what
# cyclic garbage there is waits for the next one. The older generations follow: rare full collections, and what the
# config built is frozen out of their reach anyway (freeze_built_objects).
GC_THRESHOLDS = (100_000, 20, 100)


def freeze_built_objects() -> None:
    """What the config built lives as long as the process: move it out of the cyclic collector's reach, so full
    collections scan only what requests allocate (with 1,000 apps they scanned ~100 MB of bindings, metrics and
    windows, and throughput fell with the number of apps). Garbage frozen with it is start-up's, once. `run` has
    kept the collector off until here: at 1,000 apps, its collections during the build took ~0.1 s of 0.4 s."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.enable()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
