"""The dag-processor agent: Airflow's own ``DagFileProcessorManager``, parsing the agent's bundles in its
isolated child processes, with every metadata-database touch sent to the agent API instead.

The manager's override points (AIP-92) carry it: bundle claims, bundle state, parsing results, deleted
files, stale DAGs, callbacks and priority files go over HTTP; team look-ups, the DB-backed secrets
context and the warning purge (the orchestrator's to do) are left out. A result the orchestrator
refuses (a DAG that would run something on the orchestrator, a DAG id of another bundle) is recorded as
that file's import error, so the user sees why in the UI. A heartbeat thread keeps the agent's session.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import httpx

from airflow_remote_exec.agent.client import (
    URL_PREFIX,
    AgentApiError,
    AgentClient,
    Unreachable,
)
from airflow_remote_exec.agent.registration import use_orchestrator_executors
from airflow_remote_exec.agent.session import AgentSession, ComponentSettings, register_or_explain
from airflow_remote_exec.api.datamodels import (
    API_VERSION,
    API_VERSION_HEADER,
    BundleNames,
    BundlesClaim,
    BundleState,
    BundleStateUpdate,
    ParsedFiles,
    ParsingResult,
    PresentFiles,
)

log = logging.getLogger(__name__)

# A parsing result is persisted in seconds, a large one in tens of them; a result the orchestrator
# keeps failing on is given up after a few tries, and the file is parsed and sent again later.
RESULT_TIMEOUT = httpx.Timeout(15.0, read=120.0)
RESULT_TRIES = 5
STALE_CHECK_TIMEOUT = httpx.Timeout(10.0)
# Refusals the orchestrator gives for what a file defines; anything else is the agent's problem.
_REFUSED_CONTENT = (409, 413, 422)


def _manager_class():
    """Defined on first use: importing Airflow's manager takes seconds, and the agent's command line
    and registration do not need it."""
    from airflow.callbacks.callback_requests import CallbackRequest
    from airflow.dag_processing.manager import BundleState as AirflowBundleState
    from airflow.dag_processing.manager import DagFileInfo, DagFileProcessorManager
    from airflow.utils.file import open_maybe_zipped
    from pydantic import TypeAdapter

    callback_request = TypeAdapter(CallbackRequest)

    @attrs.define
    class AgentDagFileProcessorManager(DagFileProcessorManager):
        agent: AgentSession = attrs.field(kw_only=True)

        # -- no database, no server context -------------------------------------------------------
        @functools.cached_property
        def client(self):
            """Parse-time Variable and Connection look-ups that the agent's own secrets backends do not
            answer go to the agent API, which answers them as Airflow's Execution API would."""
            from airflow.sdk.api.client import Client

            client = Client(
                base_url=f"{self.agent.settings.api_url}{URL_PREFIX}/dag-processor/",
                token=self.agent.settings.token,
            )
            client.headers[API_VERSION_HEADER] = API_VERSION
            return client

        def prepare_server_process_context(self) -> None:
            """Secrets come from the agent's own backends and environment, never the metadata DB."""

        def _get_team_names(self, bundle_names) -> dict[str, str | None]:
            return {}

        def purge_inactive_dag_warnings(self) -> None:
            """The orchestrator's housekeeping: warnings of every bundle live there."""

        def handle_parsing_result(self, file, proc, *, session=None) -> None:
            # Airflow's own post-processing, without the database session its decorator opens.
            DagFileProcessorManager.handle_parsing_result.__wrapped__(self, file, proc, session=None)

        # -- bundles ------------------------------------------------------------------------------
        def sync_bundles(self) -> None:
            names = [bundle.name for bundle in self.get_all_bundles()]
            if self.bundle_names_to_parse:
                names = [name for name in names if name in self.bundle_names_to_parse]
            if not names:
                raise SystemExit("No DAG bundles to parse: set [dag_processor] dag_bundle_config_list.")
            self.agent.call("POST", "/bundles", BundlesClaim(names=names))
            log.info("Parsing bundles %s for the orchestrator", ", ".join(names))

        def get_bundle_state(self, bundle_name: str, *, session=None):
            state = BundleState.model_validate(self.agent.call("GET", f"/bundles/{bundle_name}/state"))
            return AirflowBundleState(last_refreshed=state.last_refreshed, version=state.version)

        def update_bundle_state(self, bundle_name: str, *, last_refreshed, version, session=None) -> None:
            body = BundleStateUpdate(last_refreshed=last_refreshed, version=version)
            self.agent.call("POST", f"/bundles/{bundle_name}/refreshed", body)

        def deactivate_deleted_dags(self, bundle_name: str, present) -> None:
            observed = sorted(self._get_observed_filelocs(present))
            self._asked(
                "PUT", f"/bundles/{bundle_name}/files", PresentFiles(observed_filelocs=observed), None
            )

        def clear_orphaned_import_errors(self, bundle_name: str, observed_filelocs, *, session=None) -> None:
            """Done by the orchestrator with the files of ``deactivate_deleted_dags``."""

        def deactivate_stale_dags(self, last_parsed: dict, *, session=None) -> None:
            now = datetime.now(UTC)
            by_bundle: dict[str, dict[str, float]] = defaultdict(dict)
            for file, finished in last_parsed.items():
                if finished is not None:
                    by_bundle[file.bundle_name][str(file.rel_path)] = max(
                        0.0, (now - finished).total_seconds()
                    )
            for bundle_name, ages in by_bundle.items():
                # Tried once: ages delivered late would make fresh DAGs look stale. Airflow checks again
                # at its next cleanup interval, with ages counted then.
                body = ParsedFiles(seconds_since_parsed=ages)
                path = f"/bundles/{bundle_name}/stale-check"
                stale = self._asked("POST", path, body, [], timeout=STALE_CHECK_TIMEOUT, max_tries=1)
                if stale:
                    log.info("Deactivated DAGs no longer in their files: %s", ", ".join(stale))

        # -- what users and the scheduler ask for ---------------------------------------------------
        def _our_bundles(self) -> BundleNames:
            return BundleNames(bundles=[bundle.name for bundle in self._dag_bundles])

        def fetch_callbacks(self) -> list:
            callbacks = []
            for callback in self._asked("POST", "/callbacks", self._our_bundles(), {"callbacks": []})[
                "callbacks"
            ]:
                try:
                    callbacks.append(callback_request.validate_python(callback))
                except ValueError as err:  # a callback of another Airflow version, say
                    log.error("Skipping a callback this agent cannot read: %s", err)
            return callbacks

        def claim_priority_files(self) -> list:
            bundles = {bundle.name: bundle for bundle in self._dag_bundles}
            files = self._asked("POST", "/priority-files", self._our_bundles(), {"files": []})["files"]
            return [
                DagFileInfo(
                    rel_path=Path(f["relative_fileloc"]),
                    bundle_name=f["bundle_name"],
                    bundle_path=bundles[f["bundle_name"]].path,
                )
                for f in files
                if f["bundle_name"] in bundles
            ]

        def _asked(self, method: str, path: str, body: Any, otherwise: Any, **options: Any) -> Any:
            """A call the parsing loop can do without this time round: a refusal is logged, not fatal,
            as Airflow's own manager treats a failed bundle refresh (a revoked token stops the agent
            through its heartbeat)."""
            try:
                return self.agent.call(method, path, body, **options)
            except (AgentApiError, Unreachable) as err:
                log.error("%s %s failed: %s", method, path, err)
                return otherwise

        # -- results -------------------------------------------------------------------------------
        def persist_parsing_result(
            self,
            *,
            bundle_name,
            bundle_version,
            version_data,
            parsing_result,
            run_duration,
            relative_fileloc,
            session=None,
        ) -> None:
            sources = {}
            for dag in parsing_result.serialized_dags:
                with open_maybe_zipped(dag.data["dag"]["fileloc"], "r") as source:
                    sources[dag.data["dag"]["relative_fileloc"]] = source.read()
            body = ParsingResult(
                bundle_version=bundle_version,
                version_data=version_data,
                relative_fileloc=relative_fileloc,
                run_duration=run_duration,
                result=parsing_result.model_dump(mode="json"),
                sources=sources,
            )
            path = f"/bundles/{bundle_name}/parsing-results"
            options = {"timeout": RESULT_TIMEOUT, "max_tries": RESULT_TRIES}
            try:
                self.agent.call("POST", path, body, **options)
            except AgentApiError as err:
                if err.status_code not in _REFUSED_CONTENT:
                    raise
                log.error(
                    "The orchestrator refused %s of bundle %s: %s", relative_fileloc, bundle_name, err.detail
                )
                refused = parsing_result.model_copy(
                    update={
                        "serialized_dags": [],
                        "warnings": [],
                        "import_errors": {relative_fileloc: err.detail},
                    }
                )
                body.result, body.sources = refused.model_dump(mode="json"), {}
                self.agent.call("POST", path, body, **options)

    return AgentDagFileProcessorManager


def bundle_config_problem() -> str | None:
    """What is wrong with the bundles this agent would parse, in one line, before it registers: a
    bundle class that does not import is the user's to fix, not a traceback from deep in Airflow."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    try:
        names = list(DagBundlesManager().get_all_bundle_names())
    except Exception as err:  # AirflowConfigException, ImportError of a classpath, ...
        return f"[dag_processor] dag_bundle_config_list is not usable: {err}"
    if not names:
        return (
            "No DAG bundles to parse: set --dag-bundle-config-list or [dag_processor] dag_bundle_config_list."
        )
    return None


def conf_num_runs() -> int:
    """``[scheduler] num_runs``, as ``airflow dag-processor`` uses it (-1: parse forever)."""
    from airflow.configuration import conf

    return conf.getint("scheduler", "num_runs")


class DagProcessorAgent:
    def __init__(self, settings: ComponentSettings, client: AgentClient | None = None):
        self.stop = threading.Event()
        self.session = AgentSession(settings, self.stop, client)

    def run(self) -> int:
        problem = bundle_config_problem()
        if problem:
            log.error(problem)
            return 1
        self.session.serve_probes()  # before registering: liveness must answer while the orchestrator is down
        refused = register_or_explain(self.session)
        if refused is not None:
            return refused
        use_orchestrator_executors(self.session.executors)
        self.session.start_heartbeats()
        manager = _manager_class()(max_runs=conf_num_runs(), agent=self.session)
        try:
            manager.run()
        except AgentApiError as err:
            log.error("The orchestrator refused this dag processor: %s", err)
            return 1
        finally:
            self.stop.set()
            self.session.deregister()
        return 0
