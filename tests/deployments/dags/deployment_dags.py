"""DAGs for the deployment tests. Every task runs on RemoteExecutor (named by its class name, as a
DAG author would) and returns where it ran: ``$DEPLOYMENT_RUNNER`` is the agent's name on an agent
and ``orchestrator`` on the orchestrator's own processes.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import chain, dag, get_current_context, task

START = datetime(2026, 1, 1)
REMOTE = {"executor": "RemoteExecutor", "retries": 0}
HOLD_LIMIT_SECONDS = 600


def runner() -> str:
    return os.environ.get("DEPLOYMENT_RUNNER", "?")


def hold(default_seconds: float) -> str:
    """Work for ``conf.seconds`` (``conf.retry_seconds`` on later tries), or until the file named
    ``conf.release`` appears in ``$DEPLOYMENT_MARKER_DIR``."""
    context = get_current_context()
    conf = context["dag_run"].conf or {}
    seconds = float(conf.get("seconds", default_seconds))
    if context["ti"].try_number > 1:
        seconds = float(conf.get("retry_seconds", seconds))
    release = Path(os.environ.get("DEPLOYMENT_MARKER_DIR", "/nonexistent")) / conf.get("release", "-")
    deadline = time.monotonic() + min(seconds, HOLD_LIMIT_SECONDS)
    while time.monotonic() < deadline and not release.exists():
        time.sleep(0.25)
    return runner()


@dag(dag_id="deploy_many", schedule=None, start_date=START, catchup=False, default_args=REMOTE)
def deploy_many():
    @task
    def work(n: int) -> str:
        return hold(3)

    for n in range(12):
        work.override(task_id=f"work_{n:02d}")(n)


@dag(dag_id="deploy_chain", schedule=None, start_date=START, catchup=False, default_args=REMOTE)
def deploy_chain():
    """Eight short tasks one after the other: each is queued while the agents wait idle."""

    @task
    def step() -> str:
        return runner()

    chain(*[step.override(task_id=f"step_{n}")() for n in range(8)])


@dag(dag_id="deploy_hold", schedule=None, start_date=START, catchup=False, default_args=REMOTE)
def deploy_hold():
    """As many tasks as the two agents have slots: all run at once, until released."""

    @task
    def held(n: int) -> str:
        return hold(HOLD_LIMIT_SECONDS)

    for n in range(8):
        held.override(task_id=f"held_{n}")(n)


@dag(
    dag_id="deploy_retry_once",
    schedule=None,
    start_date=START,
    catchup=False,
    default_args={**REMOTE, "retries": 1, "retry_delay": timedelta(seconds=1)},
)
def deploy_retry_once():
    @task
    def long_task() -> str:
        return hold(120)

    long_task()


def on_queue(queue: str):
    """A task held for a long time on a queue that only one agent serves."""

    @dag(dag_id=f"deploy_on_{queue}", schedule=None, start_date=START, catchup=False, default_args=REMOTE)
    def held_on_queue():
        @task(queue=queue)
        def held() -> str:
            return hold(HOLD_LIMIT_SECONDS)

        held()

    return held_on_queue()


on_queue("expiring")
on_queue("revoked")
deploy_many()
deploy_chain()
deploy_hold()
deploy_retry_once()
