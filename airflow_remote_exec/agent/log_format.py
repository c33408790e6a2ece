"""The agent's own log lines, as text or one JSON object per line, each naming the agent, its component
and, for a line about a job, the job: a fleet's logs collected in one place stay attributable."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(agent)s %(component)s%(job)s: %(message)s"


def job(job_id: int) -> dict[str, dict[str, int]]:
    """``extra=`` for a log call about a job."""
    return {"extra": {"job_id": job_id}}


class AgentFields(logging.Filter):
    """Adds ``agent``, ``component`` and ``job`` (`` job=N`` or nothing) to every record."""

    def __init__(self, agent: str, component: str):
        super().__init__()
        self.agent = agent
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.agent = self.agent
        record.component = self.component
        job_id = getattr(record, "job_id", None)
        record.job = f" job={job_id}" if job_id is not None else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "agent": getattr(record, "agent", None),
            "component": getattr(record, "component", None),
            "event": record.getMessage(),
        }
        if getattr(record, "job_id", None) is not None:
            doc["job_id"] = record.job_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str, agent: str = "-", component: str = "-", fmt: str = "text") -> None:
    """(Re)configure the root logger: called once at start and again once the agent knows its name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AgentFields(agent, component))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
