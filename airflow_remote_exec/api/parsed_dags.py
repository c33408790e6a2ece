"""What a dag-processor agent may publish: the checks on one parsing result before Airflow persists it.

An agent's token holder controls every byte of a serialized DAG, and the orchestrator's scheduler,
api-server and triggerer act on what is persisted. So a result is refused (422, which the agent records
as the file's import error) when it holds anything that would make the orchestrator run, import or
fetch something the DAG names:

* tasks that start from a trigger, and deadline alerts: their triggers and callbacks would run on the
  orchestrator (asset watchers are allowed: their triggers run on the token's triggerer agents only);
* any object Airflow decodes by class name (``__classname__``), and JSON-schema references and regular
  expressions in params, which the api-server and scheduler would resolve by opening a URL or a file,
  or run (a crafted pattern can take years);
* a task sent to an executor other than RemoteExecutor, or with an ``executor_config`` (a pod override
  for a Kubernetes executor, say);
* a DAG whose file did not come with its source, or whose file lies outside the parsed file;
* a task on a queue outside the token's queues (the agents of other queues are not its to use).

What is left is also checked against this orchestrator's serialization schema and fully deserialized,
as the scheduler will: a DAG the scheduler cannot load must not reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
from airflow.dag_processing.processor import DagFileParsingResult
from airflow.models.dagwarning import DagWarning
from airflow.serialization.enums import DagAttributeTypes
from airflow.serialization.serialized_objects import DagSerialization
from airflow.utils.helpers import validate_key
from fastapi import HTTPException, status
from pydantic import ValidationError

from airflow_remote_exec.api.datamodels import ParsingResult

EXECUTOR_PATH = "airflow_remote_exec.executor.RemoteExecutor"
_SCHEMA_REFERENCES = frozenset({"$ref", "$dynamicRef", "$recursiveRef", "$id", "$anchor"})
_REGEX_KEYWORDS = frozenset({"pattern", "patternProperties"})


def _refused(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail[:1000])


@cache
def remote_executor_names() -> frozenset[str]:
    """The names a task may give to run on RemoteExecutor: its class name, path and configured alias."""
    from airflow.executors.executor_loader import ExecutorLoader

    names = {"RemoteExecutor", EXECUTOR_PATH}
    for name in ExecutorLoader.get_executor_names():
        if name.module_path == EXECUTOR_PATH and name.alias:
            names.add(name.alias)
    return frozenset(names)


def dicts_in(value: Any) -> Iterator[dict]:
    """Every dict inside ``value``, without recursion (a deep body cannot exhaust the stack)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


# Values Airflow decodes by their "__type" while it loads a DAG, that a DAG's own fields are made of.
# Any other type Airflow knows (a deadline alert, a pod, a connection, an exception, a callback request)
# makes it decode, import or build objects as it loads the DAG, wherever the JSON holds it. Types that
# are class paths (timetables, partition mappers) are decoded only if registered on the orchestrator.
_SAFE_TYPES = frozenset(
    {
        DagAttributeTypes.DAG,
        DagAttributeTypes.OP,
        DagAttributeTypes.DATETIME,
        DagAttributeTypes.TIMEDELTA,
        DagAttributeTypes.TIMEZONE,
        DagAttributeTypes.RELATIVEDELTA,
        DagAttributeTypes.DICT,
        DagAttributeTypes.SET,
        DagAttributeTypes.TUPLE,
        DagAttributeTypes.TASK_GROUP,
        DagAttributeTypes.EDGE_INFO,
        DagAttributeTypes.PARAM,
        DagAttributeTypes.XCOM_REF,
        DagAttributeTypes.ASSET,
        DagAttributeTypes.ASSET_ALIAS,
        DagAttributeTypes.ASSET_ANY,
        DagAttributeTypes.ASSET_ALL,
        DagAttributeTypes.ASSET_REF,
        DagAttributeTypes.ASSET_UNIQUE_KEY,
        DagAttributeTypes.ASSET_ALIAS_UNIQUE_KEY,
        DagAttributeTypes.ARG_NOT_SET,
        DagAttributeTypes.MAPPED_ARGUMENT,
    }
)
_KNOWN_TYPES = frozenset(t.value for t in DagAttributeTypes)


def _decoded_on_load(data: dict) -> str | None:
    """What loading the DAG would already make the orchestrator import or start: checked on the JSON,
    before anything deserializes it."""
    if (data.get("dag") or {}).get("deadline"):
        return "a deadline alert (its callback would run on the orchestrator)"
    for node in dicts_in(data):
        if "__classname__" in node or "__class_path" in node:
            name = node.get("__classname__", node.get("__class_path"))
            return f"an object decoded by class name ({str(name)[:100]})"
        kind = node.get("__type")
        if isinstance(kind, str) and kind in _KNOWN_TYPES and kind not in _SAFE_TYPES:
            return f"an object of type {kind!r} (the orchestrator would build it as it loads the DAG)"
    return None


# JSON-schema keywords whose value is a schema, a list of schemas, or a map of names to schemas:
# everything else in a schema (enum, const, default, examples, property names) is data.
_SUBSCHEMA = frozenset(
    {
        "additionalItems",
        "additionalProperties",
        "contains",
        "contentSchema",
        "else",
        "if",
        "items",
        "not",
        "propertyNames",
        "then",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "dependentSchemas", "dependencies", "$defs", "definitions"}
)


def _schemas(schema: Any) -> Iterator[dict]:
    """Every schema inside ``schema`` (itself included), as jsonschema walks it: never into data."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node
        for key, value in node.items():
            if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                stack.extend(value.values())
            elif key in _SUBSCHEMA_LISTS and isinstance(value, (list, tuple)):
                stack.extend(value)
            elif key in _SUBSCHEMA:
                stack.append(value)


def _schema_problem(params: Any) -> str | None:
    """Param schemas are validated on the orchestrator (scheduler, api-server): no references it would
    fetch, no regular expressions it would run (one crafted pattern can take it years)."""
    for name in params:
        for node in _schemas(params.get_param(name).schema):
            for key in node:
                if key in _SCHEMA_REFERENCES:
                    return f"a JSON-schema {key} in param {name!r} (the orchestrator would resolve it)"
                if key in _REGEX_KEYWORDS or (key == "format" and node[key] == "regex"):
                    return (
                        f"a regular expression ({key}) in the schema of param {name!r} (the orchestrator "
                        "validates params; check the value in the task instead)"
                    )
    return None


def _run_on_the_orchestrator(dag: Any) -> str | None:
    """What the loaded DAG would make the orchestrator run: read from Airflow's own objects, so that a
    task's fields count wherever the JSON keeps them (a mapped task's ``partial_kwargs``, say)."""
    problem = _schema_problem(dag.params)
    if problem:
        return problem
    for task in dag.tasks:
        name, executor = repr(task.task_id), task.executor
        if task.start_from_trigger or task.start_trigger_args:
            return f"task {name} starting from a trigger (it would run on the orchestrator's triggerer)"
        if executor is not None and (
            not isinstance(executor, str) or executor not in remote_executor_names()
        ):
            return f"task {name} on executor {str(executor)[:100]!r} (agents' DAGs run on RemoteExecutor)"
        if task.executor_config:
            return f"task {name} with an executor_config (RemoteExecutor takes none; others act on it)"
        problem = _schema_problem(task.params)
        if problem:
            return problem
    return None


def _inside(path: str, file: str) -> bool:
    """Whether ``path`` is the parsed file or, for a zip file, one of its members."""
    return path == file or path.startswith(file + "/")


def checked_result(body: ParsingResult, queues: list[str]) -> tuple[DagFileParsingResult, dict[str, str]]:
    """The result as Airflow's model, and each DAG file's source by its ``fileloc`` on the agent; 422
    with the reason for anything that may not be persisted, including a task on a queue outside the
    token's ``queues``."""
    try:
        result = DagFileParsingResult.model_validate(body.result)
    except ValidationError as err:
        raise _refused(f"result is not a DagFileParsingResult: {err.errors()[0]['msg']}") from None
    file = body.relative_fileloc
    for path in result.import_errors or {}:
        if not _inside(path, file):
            raise _refused(f"result.import_errors names {path[:200]!r}, outside the parsed file {file!r}")
    sources: dict[str, str] = {}
    dag_ids: set[str] = set()
    for index, dag in enumerate(result.serialized_dags):
        where = f"result.serialized_dags[{index}]"
        try:
            DagSerialization.validate_schema(dag.data)
        except jsonschema.ValidationError as err:
            raise _refused(f"{where} breaks the schema: {err.message[:300]}") from None
        reason = _decoded_on_load(dag.data)
        if reason:
            raise _refused(f"DAG {str(dag.dag_id)[:250]!r} has {reason}; DAGs parsed by agents may not.")
        relative, fileloc = dag.data["dag"].get("relative_fileloc"), dag.data["dag"].get("fileloc")
        if not isinstance(relative, str) or not _inside(relative, file) or not isinstance(fileloc, str):
            raise _refused(f"{where} comes from {str(relative)[:200]!r}, not from the parsed file {file!r}")
        if relative not in body.sources:
            raise _refused(f"{where} comes from {relative!r}, whose source is not in sources")
        sources[fileloc] = body.sources[relative]
        try:
            deserialized = DagSerialization.from_dict(dag.data)
            for key in (deserialized.dag_id, *deserialized.task_ids):
                validate_key(key)
        except Exception as err:  # whatever would stop the scheduler from loading it
            raise _refused(f"{where} cannot be loaded: {type(err).__name__}: {str(err)[:300]}") from None
        reason = _run_on_the_orchestrator(deserialized)
        if reason:
            raise _refused(f"DAG {deserialized.dag_id!r} has {reason}; DAGs parsed by agents may not.")
        outside = sorted({task.queue for task in deserialized.tasks} - set(queues))
        if outside:
            raise _refused(
                f"DAG {deserialized.dag_id!r} queues tasks on {outside}, outside its token's queues {queues}"
            )
        dag_ids.add(deserialized.dag_id)
    for index, warning in enumerate(result.warnings or []):
        try:
            fields = warning if isinstance(warning, dict) else {}
            DagWarning(**fields)
        except Exception as err:
            raise _refused(f"result.warnings[{index}] is not a DAG warning: {str(err)[:200]}") from None
        if fields.get("dag_id") not in dag_ids:
            raise _refused(f"result.warnings[{index}] is about a DAG this file does not define")
    return result, sources
