"""The agent's XCom store and secrets backend, as Airflow's own settings.

The flags are a shorthand: each one only sets the Airflow setting it names, through its
``AIRFLOW__SECTION__KEY`` variable. So an Airflow deployment's environment works unchanged, and
Airflow's own code reads them in the agent and in every task, trigger and parsing process it starts.
"""

from __future__ import annotations

import argparse
import json
import os

XCOM_BACKEND = "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend"

SECRETS_BACKENDS = {
    "aws-secrets-manager": "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend",
    "aws-ssm": "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend",
    "gcp-secret-manager": "airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend",
    "azure-key-vault": "airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend",
    "vault": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
    "local-file": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
}

XCOM_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "wasb", "file")


def _env_name(section: str, key: str) -> str:
    return f"AIRFLOW__{section.upper().replace('.', '_')}__{key.upper()}"


def add_backend_args(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group(
        "backends", "Each flag sets the Airflow setting it names; setting that directly works the same."
    )
    group.add_argument(
        "--xcom-path",
        help="Keep XCom values in this object store, e.g. s3://aws_default@bucket/xcom, gs://..., "
        "abfs://..., file:///shared/xcom. Sets [core] xcom_backend to Airflow's XComObjectStorageBackend "
        "and [common.io] xcom_objectstorage_path",
    )
    group.add_argument(
        "--xcom-threshold",
        type=int,
        help="Values of this many bytes or more go to the store, smaller ones to the orchestrator's "
        "database (default with --xcom-path: 0, every value in the store; -1 keeps all in the "
        "database). Sets [common.io] xcom_objectstorage_threshold",
    )
    group.add_argument(
        "--xcom-compression",
        help="Compress stored values: gzip, bz2, lzma, zip, snappy, zstd... (an fsspec compression). "
        "Sets [common.io] xcom_objectstorage_compression",
    )
    group.add_argument(
        "--secrets-backend",
        help=f"Secrets backend for connections and variables: {', '.join(SECRETS_BACKENDS)}, or a class "
        "path. Sets [workers] secrets_backend",
    )
    group.add_argument(
        "--secrets-backend-kwargs",
        help="The backend's arguments as a JSON object. Sets [workers] secrets_backend_kwargs. Put "
        "credentials in AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS instead: a command line is visible to "
        "every local user",
    )


def apply_backend_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn the flags into Airflow settings; a malformed value is a clear error here."""
    settings: dict[str, str] = {}
    if args.xcom_path:
        scheme = args.xcom_path.split("://", 1)[0] if "://" in args.xcom_path else ""
        if scheme not in XCOM_STORE_SCHEMES:
            schemes = ", ".join(s + "://" for s in XCOM_STORE_SCHEMES)
            parser.error(f"--xcom-path must be an object-store URL ({schemes}), got {args.xcom_path!r}")
        settings[_env_name("core", "xcom_backend")] = XCOM_BACKEND
        settings[_env_name("common.io", "xcom_objectstorage_path")] = args.xcom_path
        settings[_env_name("common.io", "xcom_objectstorage_threshold")] = str(
            0 if args.xcom_threshold is None else args.xcom_threshold
        )
    elif args.xcom_threshold is not None:
        settings[_env_name("common.io", "xcom_objectstorage_threshold")] = str(args.xcom_threshold)
    if args.xcom_compression:
        settings[_env_name("common.io", "xcom_objectstorage_compression")] = args.xcom_compression
    if args.secrets_backend:
        settings[_env_name("workers", "secrets_backend")] = SECRETS_BACKENDS.get(
            args.secrets_backend, args.secrets_backend
        )
    if args.secrets_backend_kwargs is not None:
        try:
            kwargs = json.loads(args.secrets_backend_kwargs)
        except ValueError as err:
            parser.error(f"--secrets-backend-kwargs is not JSON: {err}")
        if not isinstance(kwargs, dict):
            parser.error('--secrets-backend-kwargs must be a JSON object, e.g. {"url": "https://vault:8200"}')
        settings[_env_name("workers", "secrets_backend_kwargs")] = args.secrets_backend_kwargs
    # Airflow reads its settings' variables at every look-up, so this holds even once it is loaded.
    os.environ.update(settings)
