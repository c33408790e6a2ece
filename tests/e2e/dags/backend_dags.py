"""One DAG per XCom store: 5 MB XComs travel both ways between two agents (queues ``<store>-a`` and
``<store>-b``), and the task on the second agent reads a connection and a variable from that agent's
secrets backend. The run's conf carries only digests: of the secrets, and of a marker whose digest each
payload starts with, so a scan of the orchestrator can look for both."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime

from airflow.sdk import DAG, Connection, Variable, get_current_context, task

SIZE = 5 * 1024 * 1024
STORES = ("s3", "gcs", "abfs", "file")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _payload(prefix: str) -> str:
    return prefix + os.urandom(SIZE // 2).hex()


for store in STORES:
    with DAG(f"xcom_{store}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):

        @task(queue=f"{store}-a")
        def produce() -> str:
            return _payload(_digest(get_current_context()["dag_run"].conf["marker"]) + "-first-")

        @task(queue=f"{store}-b")
        def consume(payload: str) -> str:
            conf = get_current_context()["dag_run"].conf
            assert payload.startswith(_digest(conf["marker"])) and len(payload) >= SIZE, len(payload)
            connection = Connection.get("agent_secret_conn")  # only this agent's secrets backend has it
            assert _digest(connection.password) == conf["password_digest"], "wrong connection"
            assert _digest(Variable.get("agent_secret_var")) == conf["variable_digest"], "wrong variable"
            return _payload(f"{_digest(conf['marker'])}-reply-{_digest(payload)}-")

        @task(queue=f"{store}-a")
        def verify(payload: str, reply: str) -> list[int]:
            assert _digest(payload) in reply[:200], "the reply is not to this payload"
            return [len(payload), len(reply)]

        @task(queue=f"{store}-b")
        def size(value: int) -> int:
            return value

        first = produce()
        size.expand(value=verify(first, consume(first)))
