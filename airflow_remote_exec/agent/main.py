"""``airflow-remote-agent``: the execution-plane entry point. Every flag can also come from the
environment (``AIRFLOW_REMOTE_AGENT_<FLAG>``), which suits Kubernetes secrets and config maps."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

ENV_PREFIX = "AIRFLOW_REMOTE_AGENT_"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-remote-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser("worker", help="Claim and run task instances")
    worker.add_argument(
        "--api-url",
        default=_env("API_URL"),
        help="Orchestrator base URL, e.g. https://airflow.example.com [API_URL]",
    )
    worker.add_argument(
        "--token-file", default=_env("TOKEN_FILE"), help="File holding the agent token [TOKEN_FILE]"
    )
    worker.add_argument(
        "--queues",
        default=_env("QUEUES", "default"),
        help="Comma-separated queues (default: default) [QUEUES]",
    )
    worker.add_argument(
        "--slots",
        type=int,
        default=int(_env("SLOTS", "4")),
        help="Concurrent task slots (default: 4) [SLOTS]",
    )
    worker.add_argument(
        "--name", default=_env("NAME", socket.gethostname()), help="Agent name (default: hostname) [NAME]"
    )
    worker.add_argument(
        "--health-port",
        type=int,
        default=_env("HEALTH_PORT"),
        help="Serve /healthz on this port (default: off) [HEALTH_PORT]",
    )
    worker.add_argument(
        "--health-host",
        default=_env("HEALTH_HOST", "0.0.0.0"),
        help="Address for /healthz (default: 0.0.0.0) [HEALTH_HOST]",
    )
    worker.add_argument(
        "--drain-timeout",
        type=float,
        default=float(_env("DRAIN_TIMEOUT", "300")),
        help="Seconds running tasks get to finish after SIGTERM before they are terminated "
        "(default: 300) [DRAIN_TIMEOUT]",
    )
    return parser


def _read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    token = os.environ.get(ENV_PREFIX + "TOKEN")
    if args.token_file:
        path = Path(args.token_file)
        try:
            token = path.read_text().strip()
        except OSError as err:
            parser.error(f"cannot read --token-file {path}: {err.strerror}")
    if not token:
        parser.error(f"an agent token is required: --token-file FILE or {ENV_PREFIX}TOKEN")
    return token


def settings_from_args(argv: list[str] | None = None):
    from airflow_remote_exec.agent.worker import WorkerSettings

    parser = build_parser()
    args = parser.parse_args(argv)
    url = urlparse(args.api_url or "")
    if url.scheme not in ("http", "https") or not url.netloc:
        parser.error(
            f"--api-url must be an http(s) URL such as https://airflow.example.com, got {args.api_url!r}"
        )
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    queues = sorted({q.strip() for q in args.queues.split(",") if q.strip()})
    if not queues:
        parser.error("--queues needs at least one queue")
    return WorkerSettings(
        api_url=args.api_url.rstrip("/"),
        token=_read_token(parser, args),
        queues=queues,
        slots=args.slots,
        name=args.name,
        health_host=args.health_host,
        health_port=int(args.health_port) if args.health_port not in (None, "") else None,
        drain_timeout=args.drain_timeout,
    )


def _prefer_prompt_task_exit() -> None:
    """Free a slot as soon as its task ends, unless the environment says otherwise.

    Airflow's supervisor notices that its task process exited only at its next wake-up, which can be
    up to ``[workers] min_heartbeat_interval`` (default 5 s) later; until then the agent's slot stays
    busy. One second keeps slots turning over, at one execution-API heartbeat per second per task.
    """
    os.environ.setdefault("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_args(argv)
    _prefer_prompt_task_exit()
    logging.basicConfig(
        level=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    from airflow_remote_exec.agent.worker import Worker

    sys.exit(Worker(settings).run())


if __name__ == "__main__":
    main()
