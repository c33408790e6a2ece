"""Imported once by the runners' forkserver, so every runner, and every task process a runner forks,
starts with Airflow loaded and initialised, as LocalExecutor's workers inherit it from the scheduler.

Without it each task process would load Airflow's plugins and listeners itself (a third of a second
of CPU per task, several seconds when eight tasks start together on two cores).

It also binds the forkserver to the agent: the forkserver is the runners' parent, and it hands its
own "agent alive" pipe to every process it forks, so it would never notice the agent's death. Dying
with the agent, it takes the runners (``PR_SET_PDEATHSIG``) and their tasks with it.
"""

import os

import airflow.dag_processing.dagbag  # noqa: F401 - every task parses its DAG file with it
import airflow.providers.standard.decorators.python  # noqa: F401 - the @task machinery
import airflow.providers.standard.operators.python  # noqa: F401
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.executors.base_executor import BaseExecutor  # noqa: F401
from airflow.executors.workloads import ExecuteCallback, ExecuteTask  # noqa: F401
from airflow.sdk.execution_time import supervisor  # noqa: F401
from airflow.sdk.execution_time.task_runner import get_listener_manager

from airflow_remote_exec.agent import runner

# The forkserver, and so its runners and their tasks, never outlive the agent.
runner.die_with_parent(int(os.environ.get(runner.AGENT_PID_ENV, "0")))
runner.FORKSERVER_PID = os.getpid()

get_listener_manager()  # loads plugins and their listeners
DagBundlesManager()  # parses [dag_processor] dag_bundle_config_list and imports the bundle classes
