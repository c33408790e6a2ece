"""Prometheus metrics of one agent process, served at ``GET /metrics`` beside ``/healthz``.

Each agent keeps its own registry, not prometheus-client's global one, so several agents in one process
(and tests) never share or clash on a metric. Gauges are read when scraped, so they are never stale.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "airflow_remote_agent_"
LABELS = ("agent", "component")
# Agent-API latencies run from milliseconds to a claim's long-poll of tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The gauges an agent may read at scrape time, with their help text.
GAUGES = {
    "slots": "Task slots of this worker",
    "running_jobs": "Jobs holding a slot of this worker",
    "free_slots": "Slots this worker can claim jobs for",
    "heartbeat_age_seconds": "Seconds since the last accepted heartbeat or other orchestrator contact",
}

# A path segment after one of these names is an id: the route keeps the name of its template instead.
_ID_AFTER = {
    "agents": "{session}",
    "bundles": "{bundle_name}",
    "variables": "{key}",
    "connections": "{conn_id}",
}
_JOB_ROUTES = frozenset({"claim", "reports"})  # /jobs/claim and /jobs/reports; any other is a job id
_UUID = re.compile(r"[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")

Reading = Callable[[], float | None]


def route_template(path: str) -> str:
    """The agent-API route of ``path`` with its ids replaced (``/agents/{session}/jobs/{job_id}/log``),
    so a route label stays one of a few values however many sessions, jobs and bundles there are."""
    route: list[str] = []
    for segment in path.split("?", 1)[0].strip("/").split("/"):
        parent = route[-1] if route else ""
        if parent in _ID_AFTER:
            segment = _ID_AFTER[parent]
        elif parent == "jobs" and segment not in _JOB_ROUTES:
            segment = "{job_id}"
        elif segment.isdigit() or _UUID.fullmatch(segment):
            segment = "{id}"
        route.append(segment)
    return "/" + "/".join(route)


class _Readings(Collector):
    """The gauges, each read from its callback at scrape time; a reading of None leaves out its sample."""

    def __init__(self, labels: dict[str, str]):
        self._labels = labels
        self._readings: dict[str, Reading] = {}

    def read(self, name: str, reading: Reading) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name!r}; one of {', '.join(GAUGES)}")
        self._readings[name] = reading

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, text in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, text, labels=list(self._labels))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, reading in list(self._readings.items()):
            family = GaugeMetricFamily(PREFIX + name, GAUGES[name], labels=list(self._labels))
            try:
                value = reading()
            except Exception:  # a scrape must not fail because one reading did
                log.debug("Could not read gauge %s", name, exc_info=True)
                value = None
            if value is not None:
                family.add_metric(list(self._labels.values()), float(value))
            yield family


class AgentMetrics:
    """The metrics of one agent component, in a registry of its own."""

    def __init__(self, agent: str, component: str):
        self.registry = CollectorRegistry()
        labels = {"agent": agent, "component": component}
        self._values = (agent, component)
        self._readings = _Readings(labels)
        self.registry.register(self._readings)
        self.claims = Counter(
            PREFIX + "claims", "Claim requests sent", LABELS, registry=self.registry
        ).labels(*self._values)
        self.jobs_claimed = Counter(
            PREFIX + "jobs_claimed", "Jobs received from claims", LABELS, registry=self.registry
        ).labels(*self._values)
        self._requests = Counter(
            PREFIX + "api_requests",
            "Agent-API requests tried, by route, method and HTTP status ('error': no answer)",
            (*LABELS, "route", "method", "status"),
            registry=self.registry,
        )
        self._latency = Histogram(
            PREFIX + "api_request_seconds",
            "Agent-API request latency, each try on its own",
            (*LABELS, "route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def read(self, gauge: str, reading: Reading) -> None:
        """Serve ``gauge`` (one of ``GAUGES``) from ``reading``, called at every scrape."""
        self._readings.read(gauge, reading)

    def observe_request(self, method: str, path: str, status: int | str, seconds: float) -> None:
        """One try of an agent-API request: ``status`` is its HTTP status, or ``"error"`` if it got none."""
        route = route_template(path)
        self._requests.labels(*self._values, route, method, str(status)).inc()
        self._latency.labels(*self._values, route, method).observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
