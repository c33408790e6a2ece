"""Provider registration: what Airflow discovers through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from airflow_remote_exec import __version__


def _option(description: str, type_: str, default: str, example: str | None = None) -> dict:
    return {
        "description": description,
        "version_added": None,
        "type": type_,
        "example": example,
        "default": default,
    }


CONFIG_OPTIONS: dict[str, dict] = {
    "heartbeat_interval": _option(
        "Seconds between agent heartbeats. Sent to each agent when it registers.", "integer", "10"
    ),
    "lost_after_missed_heartbeats": _option(
        "An agent that misses this many consecutive heartbeats is marked lost and its jobs are rerouted.",
        "integer",
        "3",
    ),
    "reroute_fence_seconds": _option(
        "When a lost agent's running task is failed into Airflow's retry path, its next try is not handed "
        "to another agent for this many seconds. That gives the old try's supervisor, if it still runs, "
        "time to learn from Airflow that its try is over and stop the task ([workers] "
        "min_heartbeat_interval, 5 s, plus up to 5 s to terminate), so the two never run at once.",
        "integer",
        "10",
    ),
    "claim_wait_seconds": _option(
        "Longest time a claim request is held open (long-poll) while no job is queued for the agent.",
        "integer",
        "20",
    ),
    "wakeup_poll_interval": _option(
        "Seconds between checks for new jobs while claims wait, on databases without LISTEN/NOTIFY "
        "(SQLite). On Postgres new jobs wake waiting claims at once and this is only a safety net.",
        "float",
        "0.25",
    ),
    "api_db_threads": _option(
        "Threads each api-server process runs the agent API's database work on. Python runs one thread at "
        "a time, so more threads add waiting, not speed, unless the database is far away (high latency "
        "per statement); keep it below [database] sql_alchemy_pool_size plus max_overflow. A request "
        "that waits 5 s for a thread is answered 503, which agents retry.",
        "integer",
        "4",
    ),
    "finished_job_retention": _option(
        "Seconds a finished job row is kept (for `airflow remote-exec jobs` and debugging) before the "
        "executor deletes it.",
        "integer",
        "300",
    ),
    "task_log_max_bytes": _option(
        "Most bytes of log the orchestrator stores for one run of a task on an agent. Beyond it the "
        "agent stops shipping that run's log, which then ends with a line saying so; the agent's own "
        "file keeps the rest.",
        "integer",
        str(64 * 1024 * 1024),
    ),
    "task_log_retention_days": _option(
        "Days the orchestrator keeps task logs shipped by agents, counted from their last line. 0 keeps "
        "them until their rows are deleted by hand. With another remote log store (``[logging] "
        "remote_base_log_folder`` on s3://, gs://, wasb://) the shipped copy only serves running tasks "
        "and is deleted a day after its last line, whatever this says.",
        "integer",
        "30",
    ),
    "sentinel_report_interval": _option(
        "Seconds between a sentinel agent's health reports (``airflow-remote-agent sentinel``). Sent to "
        "the sentinel with each answer; ``airflow remote-exec agents list`` calls a report older than "
        "three of these stale.",
        "integer",
        "30",
    ),
}


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-remote-exec",
        "name": "Remote Execution",
        "description": "Run Airflow tasks on agents in your own infrastructure over outbound HTTPS.",
        "versions": [__version__],
        "executors": ["airflow_remote_exec.executor.RemoteExecutor"],
        "cli": ["airflow_remote_exec.cli.get_cli_commands"],
        "plugins": [{"name": "remote_exec", "plugin-class": "airflow_remote_exec.plugin.RemoteExecPlugin"}],
        "db-managers": ["airflow_remote_exec.db.RemoteDBManager"],
        "config": {
            "remote_exec": {
                "description": "Settings of the RemoteExecutor and the agent API it serves.",
                "options": CONFIG_OPTIONS,
            }
        },
    }
