"""The oci-pull-through command: serve, healthcheck, check-config, gc, warm, ls, export, import."""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request

from dotenv import find_dotenv, load_dotenv


def healthcheck(timeout: float = 5.0) -> int:
    """Exit status for container HEALTHCHECKs: 0 when /healthz answers 200."""
    from app.config import Config, ConfigError, healthcheck_url

    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    url = healthcheck_url(config.listen_addr, config.generate_self_signed_tls)
    context = ssl._create_unverified_context() if config.generate_self_signed_tls else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            ok = response.status == 200
    except OSError as error:
        print(f"oci-pull-through: {url}: {error}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def check_config() -> int:
    """Validate the environment; print the one error line and return 1 if it is invalid."""
    from app.config import Config, ConfigError

    try:
        Config.from_env()
    except ConfigError as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        return 1
    return 0


def version() -> str:
    """The installed distribution's version, for --version and bug reports."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("oci-pull-through")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    load_dotenv(find_dotenv(usecwd=True))  # the working directory's .env, also when installed
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-healthcheck", "--healthcheck"):
        args[0] = "healthcheck"
    parser = argparse.ArgumentParser(prog="oci-pull-through")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("healthcheck", help="probe /healthz on LISTEN_ADDR; exit 0 or 1")
    sub.add_parser("check-config", help="validate the configuration; exit 0 or 1")
    from app.commands import export, gc, import_, ls, serve, warm

    commands = {
        "serve": serve,
        "gc": gc,
        "warm": warm,
        "ls": ls,
        "export": export,
        "import": import_,
    }
    for command in commands.values():
        command.add_parser(sub)
    parsed = parser.parse_args(args)
    if parsed.command == "healthcheck":
        return healthcheck()
    if parsed.command == "check-config":
        return check_config()
    if parsed.command in commands:
        return commands[parsed.command].run(parsed)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
