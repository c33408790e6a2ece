"""``airflow remote-exec tokens ...`` through Airflow's own CLI parser, on the unit-test DB."""

from __future__ import annotations

import pytest
from airflow.cli import cli_parser
from sqlalchemy import select

from airflow_remote_exec.models import RemoteToken


def _run(*argv: str) -> None:
    args = cli_parser.get_parser().parse_args(["remote-exec", "tokens", *argv])
    args.func(args)


def test_a_token_for_several_components(session, capsys):
    _run("create", "--name", "parsers", "--queues", "default", "--components", "dag-processor,worker")
    out = capsys.readouterr()
    assert out.out.strip().startswith("rex_")
    assert "components dag-processor,worker" in out.err
    row = session.scalar(select(RemoteToken).where(RemoteToken.name == "parsers"))
    assert row.components == "dag-processor,worker"
    _run("list", "--output", "json")
    assert '"components": "dag-processor,worker"' in capsys.readouterr().out


def test_a_token_is_for_workers_unless_told_otherwise(session, capsys):
    _run("create", "--name", "workers", "--queues", "default")
    assert session.scalar(select(RemoteToken.components).where(RemoteToken.name == "workers")) == "worker"


def test_an_unknown_component_is_one_line_and_creates_nothing(session, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("create", "--name", "bad", "--queues", "default", "--components", "worker,scheduler")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "scheduler" in err and "dag-processor" in err
    assert session.scalar(select(RemoteToken).where(RemoteToken.name == "bad")) is None
