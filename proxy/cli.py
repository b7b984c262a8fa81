"""The `imsidecar` command: `run --config`, `check-config`, `demo`.

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
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
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
    await sidecar.run_until_signal()


def install_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
