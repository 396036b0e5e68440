"""Entry point: parse the command line and settings, then run an instance, N supervised ones, or a command.

`tornado-gateway [--dev] [--conf FILE] [--port N]` runs the gateway;
`tornado-gateway token --sub USER --user-type TYPE` mints a token from the
same configuration, so a new user can connect within a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from .config import LOG_FIELDS, ConfigError, Settings, load_settings
from .messages import USER_TYPES, UserType
from .supervisor import supervise

log = logging.getLogger("tornado_gateway")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tornado-gateway", description="Real-time WebSocket gateway.")
    parser.add_argument("--dev", action="store_true",
                        help="development mode: insecure dev secret if none is set, embedded bus without Redis")
    parser.add_argument("--conf", help="a tornado.options conf file (executed as Python: trusted files only)")
    parser.add_argument("--port", type=int, help="overrides PORT")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the gateway (the default)")
    token = sub.add_parser("token", help="mint a JWT the configured gateway accepts")
    token.add_argument("--sub", required=True, help="the userId")
    token.add_argument("--user-type", required=True, choices=USER_TYPES)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    token.add_argument("--private-key", help="PEM private key file, for RS256/ES256")
    return parser.parse_args(argv)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line for log shippers. Every line has `time` (UTC,
    ISO 8601 with milliseconds), `level`, `logger` and `message` (the text line's message); the
    connection lines add their fields (`event`: opened/closed, `connection`, `user`, `type`,
    `device`, `platform`, `server`, `ip`; `code`, `reason`, `after` on close). Only what the text
    line says is in it: no query strings, tokens or keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, LOG_FIELDS, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(conf_file=args.conf, overrides={"port": args.port}, dev=args.dev)
    except ConfigError as exc:
        print(f"tornado-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "token":
        return print_token(settings, args)
    if settings.processes > 1:
        child_args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "run"]
        return supervise(settings.processes, child_args, settings.server_id if os.environ.get("SERVER_ID") else None)
    from .server import run  # imported only where an instance actually runs (see server.py)

    try:
        run(settings)
    except KeyboardInterrupt:
        pass
    return 0


def print_token(settings: Settings, args: argparse.Namespace) -> int:
    from .auth import mint_token  # PyJWT and cryptography: only the token command needs them here
    private_key = None
    if args.private_key:
        with open(args.private_key, encoding="utf-8") as f:
            private_key = f.read()
    user_type: UserType = args.user_type
    try:
        print(mint_token(settings, args.sub, user_type, ttl_s=args.ttl, private_key=private_key))
    except ValueError as exc:
        print(f"tornado-gateway token: {exc}", file=sys.stderr)
        return 2
    return 0


