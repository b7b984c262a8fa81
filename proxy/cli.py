"""The `imsidecar` command: `run --config`, `check-config`, `demo`, `events dead-letters|replay`.

Owns argument parsing, exit codes and what is printed; it builds nothing itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Sequence

from proxy import __version__, config
from proxy.config import Config


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
    demo.add_argument("--faults", nargs="?", const=0.2, type=float, default=0.0, metavar="SHARE",
                      help="make this share of platform calls fail in mixed ways (default 0.2 when given)")
    add_events_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "events":
        return events_command(args)
    if args.command == "run":
        loaded = load_or_report(args.config)
        return 2 if loaded is None else serve(loaded)
    from proxy.demo import run_demo
    return run_demo(args.listen, args.admin_listen, args.faults)


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
    lines = [f"listen {c.listen}, admin {c.admin_listen}, deadline {c.limits.deadline:g}s"]
    for app in c.apps:
        lines.append(f"app {app.name} ({app.platform}) id={app.client_id} secret={app.client_secret.masked()} "
                     f"token={app.token_kind}")
        for e in app.expose:
            base = app.upstreams[e.upstream].base_url
            lines.append(f"  http://{e.listen}{e.prefix or ''}/... -> {base}")
    if c.store.shared:   # the URL never holds the password; display_url shows that there is one
        lines.append(f"store redis {c.store.display_url} (tls {'on' if c.store.tls else 'off'}, "
                     f"fallback share {c.store.fallback_share:.0%})")
    return "\n".join(lines)


def serve(loaded: Config) -> int:
    from proxy.app import Sidecar
    from proxy.logs import configure

    configure(loaded.logging)
    install_fast_loop()
    asyncio.run(Sidecar(loaded).run_until_signal())
    return 0


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
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
