"""Markers for tests of features a newer Airflow minor brought (see airflow_remote_exec/compat.py)."""

from __future__ import annotations

import pytest

from airflow_remote_exec import compat

needs_connection_tests = pytest.mark.skipif(
    not compat.CONNECTION_TESTS,
    reason=f"connection tests on executors arrived in Airflow 3.3; this is {compat.AIRFLOW_VERSION}",
)


# Whole modules of tests for what an older Airflow lacks; tests/conftest.py leaves them uncollected,
# as they cannot even import there.
NEEDS_AIRFLOW_3_3 = [
    "unit/test_agent_connection_test.py",  # connection tests on executors
    # the agent dag processor and triggerer (compat.AGENT_COMPONENTS_MINOR)
    "unit/test_dag_processor_agent.py",
    "unit/test_triggerer_agent.py",
    "api/test_dag_processing.py",
    "api/test_triggers.py",
    "e2e/test_dag_processor.py",
    "e2e/test_triggerer.py",
]


def not_collected() -> list[str]:
    return NEEDS_AIRFLOW_3_3 if compat.AIRFLOW_MINOR < (3, 3) else []
