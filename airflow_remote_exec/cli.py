"""``airflow remote-exec ...``: manage agent tokens and see agents."""

from __future__ import annotations

import sys

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

_CLI = "airflow_remote_exec.cli_commands."

ARG_OUTPUT = Arg(
    ("-o", "--output"),
    help="Output format: table, json, yaml or plain (default: table)",
    choices=("table", "json", "yaml", "plain"),
    default="table",
)
ARG_NAME = Arg(("--name",), help="Token name (unique)", required=True)
ARG_QUEUES = Arg(
    ("--queues",), help="Comma-separated queues the token may serve, e.g. default,gpu", required=True
)
ARG_COMPONENTS = Arg(
    ("--components",),
    help="Comma-separated components its agents may run: worker, dag-processor, triggerer, sentinel "
    "(default: worker)",
    default="worker",
)
ARG_EXPIRES = Arg(
    ("--expires",), help="Lifetime such as 30d, 12h or 2w (default: never expires)", default=None
)
ARG_TOKEN_NAME = Arg(("name",), help="Name of the token")
ARG_AGENT_NAME = Arg(("name",), help="Name of the agent")
ARG_AGENT_FILTER = Arg(("name",), nargs="?", default=None, help="Only this agent")

TOKEN_COMMANDS = (
    ActionCommand(
        name="create",
        help="Create an agent token and print it once",
        func=lazy_load_command(_CLI + "tokens_create"),
        args=(ARG_NAME, ARG_QUEUES, ARG_COMPONENTS, ARG_EXPIRES),
    ),
    ActionCommand(
        name="list",
        help="List agent tokens (never their secrets)",
        func=lazy_load_command(_CLI + "tokens_list"),
        args=(ARG_OUTPUT,),
    ),
    ActionCommand(
        name="revoke",
        help="Revoke an agent token; its agents get 401 on their next request",
        func=lazy_load_command(_CLI + "tokens_revoke"),
        args=(ARG_TOKEN_NAME,),
    ),
)

AGENT_COMMANDS = (
    ActionCommand(
        name="list",
        help="List agents with their state, when it changed, components, queues, slots and last heartbeat",
        func=lazy_load_command(_CLI + "agents_list"),
        args=(ARG_OUTPUT,),
    ),
    ActionCommand(
        name="history",
        help="Every recorded state change of agents (registered, active, draining, lost, gone) and why",
        func=lazy_load_command(_CLI + "agents_history"),
        args=(ARG_AGENT_FILTER, ARG_OUTPUT),
    ),
    ActionCommand(
        name="drain",
        help="Stop new claims by an agent; its running tasks finish",
        func=lazy_load_command(_CLI + "agents_drain"),
        args=(ARG_AGENT_NAME,),
    ),
    ActionCommand(
        name="resume",
        help="Let a drained agent claim jobs again",
        func=lazy_load_command(_CLI + "agents_resume"),
        args=(ARG_AGENT_NAME,),
    ),
)


ARG_API_HOST = Arg(("--host",), help="Address to listen on (default: 0.0.0.0)", default="0.0.0.0")
ARG_API_PORT = Arg(("--port",), help="Port to listen on (default: 8090)", type=int, default=8090)
ARG_API_WORKERS = Arg(
    ("--workers",), help="Worker processes, each with its own connections (default: 1)", type=int, default=1
)

API_SERVER_COMMAND = ActionCommand(
    name="api-server",
    help="Serve only the agent API (/remote/v1), without the Airflow UI, e.g. behind the same URL",
    func=lazy_load_command(_CLI + "api_server"),
    args=(ARG_API_HOST, ARG_API_PORT, ARG_API_WORKERS),
)


def get_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="remote-exec",
            help="Manage remote execution agents and their tokens",
            subcommands=(
                GroupCommand(
                    name="tokens", help="Create, list and revoke agent tokens", subcommands=TOKEN_COMMANDS
                ),
                GroupCommand(name="agents", help="See remote agents", subcommands=AGENT_COMMANDS),
                API_SERVER_COMMAND,
            ),
        )
    ]


def fail(message: str) -> None:
    """End a command with a one-line error and exit code 1, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
