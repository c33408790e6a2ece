from datetime import timedelta

import pytest

from airflow_remote_exec.models import utcnow
from airflow_remote_exec.tokens import (
    TokenError,
    create_token,
    find_valid_token,
    hash_token,
    parse_components,
    parse_duration,
    parse_queues,
    token_status,
)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 1209600), ("45s", 45)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "3y", "d30", "0d", "-1d", "1.5h"])
def test_parse_duration_rejects_bad_input(text):
    with pytest.raises(TokenError):
        parse_duration(text)


def test_parse_queues_sorts_and_dedupes():
    assert parse_queues(" gpu,default,gpu ") == ["default", "gpu"]


@pytest.mark.parametrize("text", ["", " , ", "bad queue", "a;b"])
def test_parse_queues_rejects_bad_input(text):
    with pytest.raises(TokenError):
        parse_queues(text)


def test_parse_components_sorts_and_dedupes():
    assert parse_components("triggerer, worker,dag-processor,worker") == [
        "dag-processor",
        "triggerer",
        "worker",
    ]


@pytest.mark.parametrize("text", ["", " , ", "scheduler", "worker,webserver"])
def test_parse_components_rejects_bad_input(text):
    with pytest.raises(TokenError, match="component"):
        parse_components(text)


def test_components_of_the_wire_are_the_models(session):
    from typing import get_args

    from airflow_remote_exec.api.datamodels import ComponentName
    from airflow_remote_exec.models import Component

    assert get_args(ComponentName) == Component.ALL
    row, _ = create_token(session, "parser", ["default"], components=["dag-processor", "worker"])
    assert row.component_list == ["dag-processor", "worker"]


def test_token_is_stored_only_as_hash(session):
    row, secret = create_token(session, "t-hash", ["default"])
    assert secret.startswith("rex_") and len(secret) > 40
    assert row.token_hash == hash_token(secret) != secret
    assert find_valid_token(session, secret).id == row.id


def test_unknown_revoked_and_expired_tokens_are_invalid(session):
    row, secret = create_token(session, "t-life", ["default"], expires_in=timedelta(hours=1))
    assert find_valid_token(session, secret + "x") is None
    assert find_valid_token(session, "not-a-token") is None
    assert find_valid_token(session, secret, now=utcnow() + timedelta(hours=2)) is None
    assert token_status(row, now=utcnow() + timedelta(hours=2)) == "expired"
    row.revoked_at = utcnow()
    assert find_valid_token(session, secret) is None
    assert token_status(row) == "revoked"


def test_duplicate_token_name_is_refused(session):
    create_token(session, "t-dup", ["default"])
    with pytest.raises(TokenError, match="already exists"):
        create_token(session, "t-dup", ["default"])
