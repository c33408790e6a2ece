"""Triggers and a deferring operator for the triggerer-agent tests, importable on every agent through
PYTHONPATH, as a user's own trigger package would be."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async


class SecretDigestTrigger(BaseTrigger):
    """Reads a variable where the trigger runs and fires with its digest (never the value)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def serialize(self):
        return ("remote_triggers.SecretDigestTrigger", {"key": self.key})

    async def run(self):
        from airflow.sdk import Variable

        value = await sync_to_async(Variable.get)(self.key)
        self.log.info("secret trigger marker: read variable %s", self.key)
        yield TriggerEvent({"sha256": hashlib.sha256(value.encode()).hexdigest()})


class FailingTrigger(BaseTrigger):
    def serialize(self):
        return ("remote_triggers.FailingTrigger", {})

    async def run(self):
        await asyncio.sleep(0.5)
        raise RuntimeError("trigger failed on purpose")
        yield  # an async generator, as Airflow requires


class DeferTo(BaseOperator):
    """Defers at once to a trigger of ``kind``; on resume, returns the event (pushed as its XCom)."""

    def __init__(self, *, kind: str, key: str = "", seconds: float = 0, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.key, self.seconds, self.index = kind, key, seconds, index

    def execute(self, context):
        if self.kind == "secret":
            trigger = SecretDigestTrigger(self.key)
        elif self.kind == "fail":
            trigger = FailingTrigger()
        else:
            trigger = TimeDeltaTrigger(timedelta(seconds=self.seconds))
        self.defer(trigger=trigger, method_name="resume")

    def resume(self, context, event=None):
        return event if self.kind == "secret" else "resumed"
