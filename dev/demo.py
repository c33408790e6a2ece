"""The one-command demo: stock Airflow on SQLite with the RemoteExecutor, no DAG files and no
triggerer; a dag-processor agent that parses the example DAG, a worker agent that runs it, and a
triggerer agent that runs its deferred sensor's trigger.

Run through ``./dev/demo``; ``--keep`` leaves the stack up, ``--stop`` stops a kept stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from dev.stack import (
    REPO_ROOT,
    Agent,
    DagProcessorAgent,
    Orchestrator,
    TriggererAgent,
    create_agent_token,
    free_port,
    local_bundles,
    wait_until,
)

DEMO_HOME = REPO_ROOT / ".demo"
PIDS_FILE = DEMO_HOME / "pids.json"
DAG_ID = "example_remote"
LOGGING_CONFIG = "airflow_remote_exec.logging_config.LOGGING_CONFIG"
EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
# The agents' DAG bundle: the example DAGs, parsed and run on the agents' side only.
BUNDLES = local_bundles(demo=REPO_ROOT / "dev" / "dags")


def _port(preferred: int = 8080) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(keep: bool) -> int:
    if PIDS_FILE.exists():
        print(
            f"A demo stack is still running (see {PIDS_FILE}); stop it with ./dev/demo --stop",
            file=sys.stderr,
        )
        return 1
    home = DEMO_HOME / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    no_dags = home / "orchestrator" / "dags"
    no_dags.mkdir(parents=True)
    orch = Orchestrator(
        home=home / "orchestrator",
        db_url=f"sqlite:///{home / 'orchestrator' / 'airflow.db'}",
        dags_folder=no_dags,
        executor=EXECUTOR,
        port=_port(),
        # SQLite serialises writers: keep the demo gentle. Task logs: what the agents ship, in every state.
        extra_env={
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": LOGGING_CONFIG,
        },
        components=("api-server", "scheduler"),
    )
    agent: Agent | None = None
    parser: DagProcessorAgent | None = None
    triggerer: TriggererAgent | None = None
    started = time.monotonic()
    try:
        _say(f"orchestrator: airflow db migrate (SQLite) in {orch.home}")
        orch.migrate()
        token = create_agent_token(
            orch, "demo-agent", ["default"], components=["worker", "dag-processor", "triggerer"]
        )
        _say(f"orchestrator: api-server on {orch.api_url} and scheduler; no dag-processor, triggerer or DAGs")
        orch.start()
        parser = DagProcessorAgent(orch.api_url, home / "dag-processor", token, "demo-dags", BUNDLES)
        _say("agent: airflow-remote-agent dag-processor parses dev/dags and publishes it over the API")
        parser.start()
        agent = Agent(
            orch.api_url,
            home / "agent",
            REPO_ROOT / "dev" / "dags",
            token,
            "demo-agent",
            ["default"],
            2,
            {"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": BUNDLES},
            args=["--xcom-path", f"file://{home / 'xcom'}"],
        )
        _say(
            "agent: airflow-remote-agent worker (only the API URL and a token; no DB access); "
            f"XCom values in {home / 'xcom'}, the orchestrator keeps references"
        )
        agent.start()
        triggerer = TriggererAgent(orch.api_url, home / "triggerer", token, "demo-triggerer")
        _say("agent: airflow-remote-agent triggerer runs the triggers of deferred tasks")
        triggerer.start()
        with orch.client() as client:
            client.wait_for_dag(DAG_ID)
            run_id = client.trigger(DAG_ID)
            _say(f"triggered {DAG_ID} run {run_id}; waiting for it to finish")
            state = client.wait_for_run(DAG_ID, run_id, timeout=300)
            tis = client.task_instances(DAG_ID, run_id)
            report_log = [
                line for line in client.task_log(DAG_ID, run_id, "report") if "sum of squares" in line
            ]
        _print_results(state, tis, _agents_by_try(orch, run_id), time.monotonic() - started)
        print(f"The log of 'report', shipped by the agent and served by the REST API: {report_log}\n")
        ok = state == "success" and all(ti["state"] == "success" for ti in tis) and bool(report_log)
        if not ok:
            print(orch.logs(20), "\n--- agent:\n", agent.log_tail(40), file=sys.stderr)
        if keep:
            _keep(orch, agent, parser, triggerer)
            return 0 if ok else 1
        return 0 if ok else 1
    except Exception as err:  # the demo's user wants the reason, not a traceback
        print(f"demo failed: {err}", file=sys.stderr)
        for process in (parser, agent, triggerer):
            if process is not None:
                print(f"--- {process.name} log:\n{process.log_tail(30)}", file=sys.stderr)
        keep = False
        return 1
    finally:
        if not keep:
            _say("stopping agents and orchestrator")
            for process in (triggerer, agent, parser):
                if process is not None:
                    process.stop()
            orch.stop()


def _agents_by_try(orch: Orchestrator, run_id: str) -> dict[tuple[str, int, int], str]:
    """Which agent ran each try, from the executor's own job table."""
    engine = sa.create_engine(orch.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT task_id, map_index, try_number, agent_name FROM remote_job WHERE run_id = :r"
                ),
                {"r": run_id},
            )
            return {(r.task_id, r.map_index, r.try_number): r.agent_name for r in rows}
    finally:
        engine.dispose()


def _print_results(state: str, tis: list[dict], agents: dict, elapsed: float) -> None:
    print(f"\nDAG run {DAG_ID}: {state} in {elapsed:.0f}s\n")
    print(f"{'task':<16}{'map':>5}  {'state':<10}{'tries':>6}  agent")
    for ti in sorted(tis, key=lambda t: (t["start_date"] or "", t["task_id"], t["map_index"])):
        map_index = "" if ti["map_index"] < 0 else str(ti["map_index"])
        print(
            f"{ti['task_id']:<16}{map_index:>5}  {ti['state']:<10}{ti['try_number']:>6}  "
            f"{agents.get((ti['task_id'], ti['map_index'], ti['try_number'])) or '-'}"
        )
    print()


def _keep(orch: Orchestrator, agent: Agent, parser: DagProcessorAgent, triggerer: TriggererAgent) -> None:
    agents = [agent.process.pid, parser.process.pid, triggerer.process.pid]
    PIDS_FILE.write_text(json.dumps([p.pid for p in orch.processes.values()] + agents))
    print(f"The stack keeps running. Airflow UI: {orch.api_url}  (login admin / admin)")
    print(f"Logs: {orch.logs_dir}, {agent.home / 'agent.log'}, {parser.log_file} and {triggerer.log_file}")
    print("Stop it with: ./dev/demo --stop")


def stop() -> int:
    if not PIDS_FILE.exists():
        print("No demo stack is running.")
        return 0
    pids = json.loads(PIDS_FILE.read_text())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

        def all_gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() for pid in pids)

        try:
            wait_until(all_gone, 30, what="demo processes to stop")
            break
        except TimeoutError:
            continue
    PIDS_FILE.unlink()
    print("Demo stack stopped.")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev/demo", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep", action="store_true", help="leave the stack running and print the UI address")
    group.add_argument("--stop", action="store_true", help="stop a stack left running by --keep")
    args = parser.parse_args()
    DEMO_HOME.mkdir(exist_ok=True)
    sys.exit(stop() if args.stop else run(args.keep))


if __name__ == "__main__":
    main()
