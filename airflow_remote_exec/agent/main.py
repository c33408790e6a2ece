"""``airflow-remote-agent``: the execution-plane entry point. Every flag can also come from the
environment (``AIRFLOW_REMOTE_AGENT_<FLAG>``), which suits Kubernetes secrets and config maps."""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import os
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from airflow_remote_exec.agent import connection_test, log_format
from airflow_remote_exec.agent.backends import add_backend_args, apply_backend_args
from airflow_remote_exec.agent.sentinel import parse_watch
from airflow_remote_exec.agent.session import ComponentSettings

ENV_PREFIX = "AIRFLOW_REMOTE_AGENT_"
TOKEN_ENV = ENV_PREFIX + "TOKEN"
BUNDLE_CONFIG_ENV = "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"
PR_SET_DUMPABLE = 4
MAX_TRIGGERER_CAPACITY = 10_000
TASK_LOG_MODES = ("ship", "keep")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckSettings:
    """``airflow-remote-agent check``: run the start-up checks and report, then exit."""

    name: str


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _add_connection_args(command: argparse.ArgumentParser, default_name: str, backends: bool = True) -> None:
    """What every component needs to reach the orchestrator as this agent, and its backends."""
    command.add_argument(
        "--api-url",
        default=_env("API_URL"),
        help="Orchestrator base URL, e.g. https://airflow.example.com [API_URL]",
    )
    command.add_argument(
        "--token-file", default=_env("TOKEN_FILE"), help="File holding the agent token [TOKEN_FILE]"
    )
    command.add_argument(
        "--name", default=_env("NAME", default_name), help=f"Agent name (default: {default_name}) [NAME]"
    )
    command.add_argument(
        "--allow-insecure-http",
        action="store_true",
        default=_env("ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes"),
        help="Accept an http:// --api-url on a non-loopback host: the token and every task's "
        "credentials would cross the network in clear text [ALLOW_INSECURE_HTTP]",
    )
    _add_log_format_arg(command)
    if backends:
        add_backend_args(command)


def _add_log_format_arg(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-format",
        choices=log_format.FORMATS,
        default=_env("LOG_FORMAT", "text"),
        help="The agent's own log lines: 'text' or 'json', one object per line with the agent, the "
        "component and the job (default: text) [LOG_FORMAT]",
    )


def _add_queues_arg(command: argparse.ArgumentParser, meaning: str) -> None:
    command.add_argument(
        "--queues", default=_env("QUEUES", "default"), help=f"{meaning} (default: default) [QUEUES]"
    )


def _add_health_args(command: argparse.ArgumentParser) -> None:
    """The local port for Kubernetes probes and Prometheus scrapes, which every component can serve."""
    command.add_argument(
        "--health-port",
        type=int,
        default=_env("HEALTH_PORT"),
        help="Serve /healthz and /metrics (Prometheus) on this port (default: off) [HEALTH_PORT]",
    )
    command.add_argument(
        "--health-host",
        default=_env("HEALTH_HOST", "0.0.0.0"),
        help="Address for /healthz and /metrics (default: 0.0.0.0) [HEALTH_HOST]",
    )


def _health_port(args: argparse.Namespace) -> int | None:
    return int(args.health_port) if args.health_port not in (None, "") else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-remote-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser("worker", help="Claim and run task instances")
    _add_connection_args(worker, socket.gethostname())
    _add_queues_arg(worker, "Comma-separated queues")
    worker.add_argument(
        "--slots",
        type=int,
        default=int(_env("SLOTS", "4")),
        help="Concurrent task slots (default: 4) [SLOTS]",
    )
    _add_health_args(worker)
    worker.add_argument(
        "--drain-timeout",
        type=float,
        default=float(_env("DRAIN_TIMEOUT", "300")),
        help="Seconds running tasks get to finish after SIGTERM before they are terminated "
        "(default: 300) [DRAIN_TIMEOUT]",
    )
    worker.add_argument(
        "--connection-tests",
        choices=connection_test.MODES,
        default=_env("CONNECTION_TESTS", "held"),
        help="Connection tests from the UI: 'held' tests only connections this agent's secrets backends "
        "hold; 'any' also tests details typed into a request (a hook may then use this agent's ambient "
        "credentials); 'off' (default: held) [CONNECTION_TESTS]",
    )
    worker.add_argument(
        "--task-logs",
        choices=TASK_LOG_MODES,
        default=_env("TASK_LOGS", "ship"),
        help="'ship' sends each task's log to the orchestrator as it is written, for the UI; 'keep' "
        "leaves task logs on this agent (and in your object storage with Airflow's remote logging): "
        "logs hold what tasks print, TaskFlow return values included (default: ship) [TASK_LOGS]",
    )
    worker.add_argument(
        "--log-backlog-mb",
        type=int,
        default=int(_env("LOG_BACKLOG_MB", "512")),
        help="Most unsent log of finished tasks the agent keeps sending once the orchestrator answers "
        "again; beyond it the largest rest is given up, and stays in its log file (default: 512) "
        "[LOG_BACKLOG_MB]",
    )
    dag_processor = commands.add_parser(
        "dag-processor", help="Parse this agent's DAG bundles and publish them to the orchestrator"
    )
    # Its own default name: a worker on the same host keeps the hostname.
    _add_connection_args(dag_processor, f"{socket.gethostname()}-dag-processor")
    dag_processor.add_argument(
        "--dag-bundle-config-list",
        default=_env("DAG_BUNDLE_CONFIG_LIST"),
        help="The bundles to parse, as Airflow's [dag_processor] dag_bundle_config_list JSON "
        "(default: that setting) [DAG_BUNDLE_CONFIG_LIST]",
    )
    _add_health_args(dag_processor)
    triggerer = commands.add_parser(
        "triggerer", help="Run the triggers of deferred tasks and asset watchers of this agent's scope"
    )
    _add_connection_args(triggerer, f"{socket.gethostname()}-triggerer")
    _add_queues_arg(triggerer, "Comma-separated queues whose deferred tasks' triggers it runs")
    triggerer.add_argument(
        "--capacity",
        type=int,
        default=int(_env("CAPACITY", "1000")),
        help="Most triggers run at once, as Airflow's [triggerer] capacity (default: 1000) [CAPACITY]",
    )
    _add_health_args(triggerer)
    sentinel = commands.add_parser(
        "sentinel", help="Probe this agent's components' /healthz and report their health to the orchestrator"
    )
    _add_connection_args(sentinel, f"{socket.gethostname()}-sentinel", backends=False)
    sentinel.add_argument(
        "--watch",
        action="append",
        default=[w for w in [_env("WATCH")] if w],
        metavar="NAME=URL",
        help="A component to probe, e.g. worker-etl=http://agent-worker-etl:8080/healthz; repeat it, or "
        "give a comma-separated list [WATCH]",
    )
    _add_health_args(sentinel)
    check = commands.add_parser(
        "check", help="Check the XCom store and secrets backend as the agent would at start, and report"
    )
    check.add_argument(
        "--name", default=_env("NAME", socket.gethostname()), help="Agent name for the probe object [NAME]"
    )
    add_backend_args(check)
    return parser


def _queues(parser: argparse.ArgumentParser, text: str) -> list[str]:
    queues = sorted({q.strip() for q in text.split(",") if q.strip()})
    if not queues:
        parser.error("--queues needs at least one queue")
    return queues


def _read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The token, from the file or the environment; the environment variable is removed at once, so
    no runner or task process inherits it."""
    token = os.environ.pop(TOKEN_ENV, None)
    if args.token_file:
        path = Path(args.token_file)
        try:
            token = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as err:
            parser.error(f"cannot read --token-file {path}: {err.strerror}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "Token file %s is readable by group or others (mode %o); make it 0400 and run tasks as "
                "another user (see the README's trust model)",
                path,
                stat.S_IMODE(mode),
            )
    if not token:
        parser.error(f"an agent token is required: --token-file FILE or {TOKEN_ENV}")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hide_process_memory() -> None:
    """Make this process non-dumpable: its /proc files (environment, memory) then belong to root, so
    task code running as the same user cannot read the token out of the agent (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_DUMPABLE) is not available here")


def _check_api_url(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    url = urlparse(args.api_url or "")
    if url.scheme not in ("http", "https") or not url.netloc:
        parser.error(
            f"--api-url must be an http(s) URL such as https://airflow.example.com, got {args.api_url!r}"
        )
    if url.scheme == "http" and not _is_loopback(url.hostname or "") and not args.allow_insecure_http:
        parser.error(
            f"--api-url {args.api_url} is plain http:// to another host: the agent token and every "
            "task's credentials would cross the network unencrypted. Use https://, or pass "
            "--allow-insecure-http if the network is already encrypted (a service mesh, a VPN)."
        )
    return args.api_url.rstrip("/")


def _check_bundle_config(parser: argparse.ArgumentParser, text: str | None) -> None:
    """A bundle list given on the command line becomes Airflow's own setting; a malformed one is a clear
    error here, not a traceback from Airflow's bundle manager."""
    if text is None:
        return
    try:
        bundles = json.loads(text)
    except ValueError as err:
        parser.error(f"--dag-bundle-config-list is not JSON: {err}")
    if not isinstance(bundles, list) or not all(
        isinstance(b, dict) and isinstance(b.get("name"), str) and isinstance(b.get("classpath"), str)
        for b in bundles
    ):
        parser.error(
            '--dag-bundle-config-list must be a JSON list of {"name": ..., "classpath": ..., "kwargs": {...}}'
        )
    os.environ[BUNDLE_CONFIG_ENV] = text


def _component_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, api_url: str
) -> ComponentSettings:
    """A dag processor's, triggerer's or sentinel's settings: what they share, and each one's own."""
    own: dict = {}
    if args.command == "sentinel":
        try:
            own["watch"] = parse_watch(args.watch)
        except ValueError as err:
            parser.error(str(err))
    elif args.command == "dag-processor":
        _check_bundle_config(parser, args.dag_bundle_config_list)
    else:
        if not 1 <= args.capacity <= MAX_TRIGGERER_CAPACITY:
            parser.error(f"--capacity must be between 1 and {MAX_TRIGGERER_CAPACITY}")
        own.update(queues=_queues(parser, args.queues), capacity=args.capacity)
    return ComponentSettings(
        api_url,
        _read_token(parser, args),
        args.name,
        args.command,
        log_format=args.log_format,
        health_host=args.health_host,
        health_port=_health_port(args),
        **own,
    )


def settings_from_args(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "sentinel":
        apply_backend_args(parser, args)
    if args.command == "check":
        return CheckSettings(args.name)
    api_url = _check_api_url(parser, args)
    if args.command in ("sentinel", "dag-processor", "triggerer"):
        return _component_settings(parser, args, api_url)
    from airflow_remote_exec.agent.worker import WorkerSettings

    if args.slots < 1:
        parser.error("--slots must be at least 1")
    if args.task_logs not in TASK_LOG_MODES:
        parser.error(f"--task-logs must be one of {', '.join(TASK_LOG_MODES)}")
    if args.log_backlog_mb < 1:
        parser.error("--log-backlog-mb must be at least 1")
    if args.connection_tests not in connection_test.MODES:
        parser.error(f"--connection-tests must be one of {', '.join(connection_test.MODES)}")
    os.environ[connection_test.MODE_ENV] = args.connection_tests  # read by the runner processes
    queues = _queues(parser, args.queues)
    return WorkerSettings(
        api_url=api_url,
        token=_read_token(parser, args),
        queues=queues,
        slots=args.slots,
        name=args.name,
        health_host=args.health_host,
        health_port=_health_port(args),
        drain_timeout=args.drain_timeout,
        ship_task_logs=args.task_logs == "ship",
        log_backlog_bytes=args.log_backlog_mb * 1024 * 1024,
        log_format=args.log_format,
    )


def _prefer_prompt_task_exit() -> None:
    """Free a slot as soon as its task ends, unless the environment says otherwise.

    Airflow's supervisor notices that its task process exited only at its next wake-up, which can be
    up to ``[workers] min_heartbeat_interval`` (default 5 s) later; until then the agent's slot stays
    busy. One second keeps slots turning over, at one execution-API heartbeat per second per task.
    """
    os.environ.setdefault("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")


def _keep_rendered_fields_on_the_agent() -> None:
    """Airflow stores each task's rendered template fields in the orchestrator's database, and for a
    TaskFlow task they are its arguments: the XCom values it was given, whatever store holds them. So
    agents send them empty, unless ``AIRFLOW__CORE__MAX_TEMPLATED_FIELD_LENGTH`` is in their
    environment (this variable overrides the setting in the agent's airflow.cfg)."""
    os.environ.setdefault("AIRFLOW__CORE__MAX_TEMPLATED_FIELD_LENGTH", "0")


def _report_checks(agent_name: str) -> int:
    from airflow_remote_exec.agent.checks import run_checks

    findings = run_checks(agent_name)
    for finding in findings:
        print(finding.line())
    return 0 if all(finding.ok for finding in findings) else 1


def _exit_unless_backends_work(settings) -> None:
    """One line per setting at fault, and exit: a wrong bucket or URL must not wait for a task."""
    from airflow_remote_exec.agent.checks import run_checks

    is_worker = not isinstance(settings, ComponentSettings)
    findings = run_checks(settings.name, xcom=is_worker)
    for finding in findings:
        level = logging.ERROR if not finding.ok else logging.WARNING if finding.warning else logging.INFO
        log.log(level, "%s: %s", finding.subject, finding.text)
    if not all(finding.ok for finding in findings):
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    level = os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO")
    log_format.configure(level)
    settings = settings_from_args(argv)
    if isinstance(settings, CheckSettings):
        sys.exit(_report_checks(settings.name))
    component = settings.component if isinstance(settings, ComponentSettings) else "worker"
    log_format.configure(level, settings.name, component, settings.log_format)
    _hide_process_memory()
    if component == "sentinel":
        from airflow_remote_exec.agent.sentinel import SentinelAgent

        sys.exit(SentinelAgent(settings).run())
    if component in ("dag-processor", "triggerer"):
        from airflow_remote_exec import compat

        compat.require_airflow(f"agent {component}", compat.AGENT_COMPONENTS_MINOR)
    _exit_unless_backends_work(settings)
    if isinstance(settings, ComponentSettings) and settings.component == "dag-processor":
        from airflow_remote_exec.agent.dag_processor import DagProcessorAgent

        # Airflow's example DAGs are a bundle of the orchestrator's; the agent parses only its own.
        os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        sys.exit(DagProcessorAgent(settings).run())
    if isinstance(settings, ComponentSettings):
        from airflow_remote_exec.agent.triggerer import TriggererAgent

        sys.exit(TriggererAgent(settings).run())
    _prefer_prompt_task_exit()
    _keep_rendered_fields_on_the_agent()
    from airflow_remote_exec.agent.worker import Worker

    sys.exit(Worker(settings).run())


if __name__ == "__main__":
    main()
