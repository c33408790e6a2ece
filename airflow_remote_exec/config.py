"""Typed access to the ``[remote_exec]`` section (defaults come from ``provider.CONFIG_OPTIONS``)."""

from __future__ import annotations

from airflow.configuration import conf

from airflow_remote_exec.provider import CONFIG_OPTIONS

SECTION = "remote_exec"


def _default(key: str) -> str:
    return CONFIG_OPTIONS[key]["default"]


def heartbeat_interval() -> int:
    return conf.getint(SECTION, "heartbeat_interval", fallback=int(_default("heartbeat_interval")))


def lost_after_missed_heartbeats() -> int:
    return conf.getint(
        SECTION, "lost_after_missed_heartbeats", fallback=int(_default("lost_after_missed_heartbeats"))
    )


def claim_wait_seconds() -> int:
    return conf.getint(SECTION, "claim_wait_seconds", fallback=int(_default("claim_wait_seconds")))


def wakeup_poll_interval() -> float:
    return conf.getfloat(SECTION, "wakeup_poll_interval", fallback=float(_default("wakeup_poll_interval")))


def finished_job_retention() -> int:
    return conf.getint(SECTION, "finished_job_retention", fallback=int(_default("finished_job_retention")))


def reroute_fence_seconds() -> int:
    return conf.getint(SECTION, "reroute_fence_seconds", fallback=int(_default("reroute_fence_seconds")))


def api_db_threads() -> int:
    return max(1, conf.getint(SECTION, "api_db_threads", fallback=int(_default("api_db_threads"))))


def task_log_max_bytes() -> int:
    return conf.getint(SECTION, "task_log_max_bytes", fallback=int(_default("task_log_max_bytes")))


def task_log_retention_days() -> int:
    """0 (or less) keeps shipped task logs."""
    days = conf.getint(SECTION, "task_log_retention_days", fallback=int(_default("task_log_retention_days")))
    return max(0, days)


def sentinel_report_interval() -> int:
    return max(
        1,
        conf.getint(SECTION, "sentinel_report_interval", fallback=int(_default("sentinel_report_interval"))),
    )
