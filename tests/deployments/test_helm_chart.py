"""The Helm chart in ``helm/airflow-remote-agent``, rendered, linted and validated offline.

No cluster and no helm binary: the Helm v4 SDK renders the chart and checks its values against
values.schema.json (as ``helm install`` does), and kubernetes-validate checks every built-in manifest
against the Kubernetes API's own schemas. KEDA's kinds are not in those, so their shape is checked
here against what KEDA reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmError, HelmRenderError, HelmValuesError, lint, values_from_yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "airflow-remote-agent"
FULL_VALUES = CHART_DIR / "examples" / "values-full.yaml"
RELEASE = "agents"
NAMESPACE = "data"
PREFIX = f"{RELEASE}-airflow-remote-agent"
KUBE_VERSIONS = sorted({"1.30.0", latest_version()})
KEDA_API = "keda.sh/v1alpha1"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
TOKEN_PATH = "/var/run/airflow-remote-agent/token"


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    loaded = Chart.load(CHART_DIR)
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="module")
def full_values() -> dict[str, Any]:
    return values_from_yaml(FULL_VALUES.read_text())


def render(chart: Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for these values, parsed (NOTES.txt left out)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} rendered {len(matches)} times: {kinds_and_names(docs)}"
    return matches[0]


def kinds_and_names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def flag(deployment: dict[str, Any], name: str) -> list[str]:
    """Every value the container's args give ``--name``."""
    prefix = f"--{name}="
    return [a[len(prefix) :] for a in container(deployment)["args"] if a.startswith(prefix)]


def two_groups(**gpu: Any) -> dict[str, Any]:
    return {
        "workers": [
            {"name": "general", "queues": ["default", "reporting"], "slots": 8, "replicas": 3},
            {"name": "gpu", "queues": ["gpu", "gpu:a100"], "slots": 2, "replicas": 0, **gpu},
        ]
    }


def test_default_values_render_a_working_example(chart):
    docs = render(chart)
    assert kinds_and_names(docs) == {
        ("ServiceAccount", PREFIX),
        ("Deployment", f"{PREFIX}-worker-default"),
        ("Service", f"{PREFIX}-worker-default"),
        ("PodDisruptionBudget", f"{PREFIX}-worker-default"),
        ("Deployment", f"{PREFIX}-sentinel"),
    }
    worker = find(docs, "Deployment", f"{PREFIX}-worker-default")
    assert container(worker)["args"][0] == "worker"
    assert flag(worker, "api-url") == ["https://airflow.example.com"]
    assert flag(worker, "queues") == ["default"]
    assert flag(worker, "slots") == ["4"]
    assert flag(worker, "token-file") == [TOKEN_PATH]
    assert flag(worker, "log-format") == ["json"]
    assert worker["spec"]["replicas"] == 1
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "airflow-remote-agent-token"
    assert volumes["token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert volumes["token"]["secret"]["defaultMode"] == 0o400
    assert env_of(worker)["AIRFLOW_REMOTE_AGENT_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_full_example_renders_every_component(chart, full_values):
    docs = render(chart, full_values)
    names = kinds_and_names(docs)
    for component in ("worker-general", "worker-gpu", "dag-processor", "triggerer"):
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert (kind, f"{PREFIX}-{component}") in names
    assert ("Deployment", f"{PREFIX}-sentinel") in names
    assert ("ScaledObject", f"{PREFIX}-worker-gpu") in names
    assert ("ScaledObject", f"{PREFIX}-worker-general") not in names
    assert ("TriggerAuthentication", f"{PREFIX}-queue-depth") in names
    assert ("Secret", f"{PREFIX}-token") not in names  # the example uses an existing Secret

    account = find(docs, "ServiceAccount", "airflow-agents")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/airflow-agents"
    }
    general = find(docs, "Deployment", f"{PREFIX}-worker-general")
    assert general["spec"]["template"]["spec"]["serviceAccountName"] == "airflow-agents"
    assert flag(general, "xcom-path") == ["s3://aws_default@mycorp-airflow-xcom/xcom"]
    assert flag(general, "xcom-threshold") == ["1048576"]
    assert flag(general, "xcom-compression") == ["zstd"]
    assert flag(general, "secrets-backend") == ["aws-secrets-manager"]
    assert flag(general, "task-logs") == ["ship"]
    assert flag(find(docs, "Deployment", f"{PREFIX}-worker-gpu"), "task-logs") == ["keep"]
    assert general["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 660
    env = env_of(general)
    assert yaml.safe_load(env["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"])["region_name"] == "eu-west-1"
    bundles = yaml.safe_load(env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"])
    assert bundles == full_values["dagBundleConfigList"]
    assert env["AIRFLOW_CONN_WAREHOUSE"] == {"secretKeyRef": {"name": "warehouse-connection", "key": "uri"}}
    assert env["AIRFLOW_REMOTE_AGENT_LOG_LEVEL"] == "INFO"

    processor = find(docs, "Deployment", f"{PREFIX}-dag-processor")
    assert container(processor)["args"][0] == "dag-processor"
    # The bundles (credentials in their kwargs, say) go in the environment, not the readable command line.
    assert (
        yaml.safe_load(env_of(processor)["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"])
        == (full_values["dagBundleConfigList"])
    )
    assert "bundle" not in " ".join(container(processor)["args"])
    assert "xcom-path" not in " ".join(container(processor)["args"])
    triggerer = find(docs, "Deployment", f"{PREFIX}-triggerer")
    assert container(triggerer)["args"][0] == "triggerer"
    assert flag(triggerer, "queues") == ["default,reporting"]
    assert flag(triggerer, "capacity") == ["500"]
    assert triggerer["spec"]["replicas"] == 2
    assert flag(triggerer, "secrets-backend") == ["aws-secrets-manager"]


@pytest.mark.parametrize("which", ["defaults", "full example"])
def test_strict_lint_passes(which, full_values):
    values = full_values if which == "full example" else None
    report = lint(CHART_DIR, values, strict=True, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_values_the_schema_rejects():
    report = lint(CHART_DIR, {"logFormat": "xml"}, strict=True, kube_version="v1.30.0")
    assert any("logFormat" in m["error"] for m in report["messages"] if m["severity"] == 3), report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["defaults", "full example", "token value"])
def test_built_in_manifests_validate_against_kubernetes(chart, full_values, which, kube_version):
    values = {
        "defaults": None,
        "full example": full_values,
        "token value": {"token": {"existingSecret": None, "value": "s3cr3t"}, **two_groups()},
    }[which]
    docs = render(chart, values)
    built_in = [d for d in docs if d["kind"] not in KEDA_KINDS]
    assert len(built_in) >= 4
    for doc in built_in:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for {kube_version}: {err}")


def test_two_worker_groups_get_their_own_deployments(chart):
    docs = render(chart, two_groups())
    general = find(docs, "Deployment", f"{PREFIX}-worker-general")
    gpu = find(docs, "Deployment", f"{PREFIX}-worker-gpu")
    assert flag(general, "queues") == ["default,reporting"]
    assert flag(gpu, "queues") == ["gpu,gpu:a100"]
    assert flag(general, "slots") == ["8"]
    assert flag(gpu, "slots") == ["2"]
    assert general["spec"]["replicas"] == 3
    assert gpu["spec"]["replicas"] == 0
    for deployment, group in ((general, "general"), (gpu, "gpu")):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["airflow-remote-agent/worker-group"] == group
        assert deployment["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
        service = find(docs, "Service", f"{PREFIX}-worker-{group}")
        assert service["spec"]["selector"] == selector
        assert service["spec"]["ports"] == [
            {"name": "health", "port": 8080, "targetPort": "health", "protocol": "TCP"}
        ]
        pdb = find(docs, "PodDisruptionBudget", f"{PREFIX}-worker-{group}")
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        assert pdb["spec"]["maxUnavailable"] == 1
    assert not [d for d in docs if d["kind"] in KEDA_KINDS]


def test_keda_scales_a_group_on_its_queue_depth(chart):
    autoscaling = {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 6, "cooldownPeriod": 120}
    docs = render(chart, two_groups(autoscaling=autoscaling))
    gpu = find(docs, "Deployment", f"{PREFIX}-worker-gpu")
    assert "replicas" not in gpu["spec"]  # KEDA owns the count
    assert find(docs, "Deployment", f"{PREFIX}-worker-general")["spec"]["replicas"] == 3
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert scaled["apiVersion"] == auth["apiVersion"] == KEDA_API
    assert scaled["metadata"]["namespace"] == auth["metadata"]["namespace"] == NAMESPACE
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{PREFIX}-worker-gpu",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (15, 120)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    assert meta["url"] == "https://airflow.example.com/remote/v1/queues/depth?queues=gpu,gpu:a100"
    assert meta["valueLocation"] == "slots"  # pool_slots, as the workers count them
    assert meta["targetValue"] == "2"  # the group's slots
    assert meta["authMode"] == "bearer"
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's trigger metadata is map[string]string
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "token", "name": "airflow-remote-agent-token", "key": "token"}
    ]


def test_keda_reads_the_token_from_the_charts_secret_or_refuses_a_token_file(chart):
    docs = render(
        chart,
        {"token": {"existingSecret": None, "value": "s3cr3t"}, **two_groups(autoscaling={"enabled": True})},
    )
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    secret = find(docs, "Secret", f"{PREFIX}-token")
    assert auth["spec"]["secretTargetRef"][0]["name"] == secret["metadata"]["name"]
    with pytest.raises(HelmRenderError, match=r"workers\[gpu\]\.autoscaling needs the token in a Secret"):
        render(
            chart,
            {
                "token": {"existingSecret": None, "file": "/mnt/secrets/token"},
                **two_groups(autoscaling={"enabled": True}),
            },
        )


@pytest.mark.parametrize(
    ("values", "names"),
    [
        pytest.param(
            {"workers": [{"name": "a", "queues": ["q"], "slot": 2}]}, ["/workers/0", "'slot'"], id="typo"
        ),
        pytest.param(
            {"workers": [{"name": "a", "queues": ["q"], "slots": "four"}]}, ["/workers/0/slots"], id="str"
        ),
        pytest.param(
            {"workers": [{"name": "a", "queues": ["q"], "slots": 0}]}, ["/workers/0/slots"], id="zero"
        ),
        pytest.param({"logFormat": "xml"}, ["/logFormat"], id="log-format"),
        pytest.param(
            {"workers": [{"name": "a", "queues": ["gpu large"]}]}, ["/workers/0/queues/0"], id="queue-name"
        ),
        pytest.param({"workers": [{"name": "a", "queues": []}]}, ["/workers/0/queues"], id="no-queues"),
        pytest.param(
            {"workers": [{"name": "GPU", "queues": ["q"]}]}, ["/workers/0/name", "'GPU'"], id="upper"
        ),
        pytest.param({"orchestrator": {"url": None}}, ["/orchestrator", "'url'"], id="no-url"),
        pytest.param({"orchestrator": {"url": "airflow.example.com"}}, ["/orchestrator/url"], id="bare-url"),
        pytest.param(
            {"workers": [{"name": "a", "queues": ["q"], "autoscaling": {"minReplicaCount": -1}}]},
            ["/workers/0/autoscaling/minReplicaCount"],
            id="negative-min",
        ),
        pytest.param(
            {"workers": [{"name": "a", "queues": ["q"], "taskLogs": "drop"}]}, ["taskLogs"], id="logs"
        ),
        pytest.param({"sentinel": {"enable": False}}, ["/sentinel", "'enable'"], id="sentinel-typo"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(chart, values, names):
    with pytest.raises(HelmValuesError) as caught:
        render(chart, values)
    for name in names:
        assert name in str(caught.value)


def test_grace_period_shorter_than_the_drain_fails_naming_the_group(chart):
    values = two_groups(drainTimeoutSeconds=600, terminationGracePeriodSeconds=300)
    with pytest.raises(HelmRenderError, match=r"workers\[gpu\]: terminationGracePeriodSeconds \(300\)"):
        render(chart, values)
    docs = render(chart, two_groups(drainTimeoutSeconds=600))
    gpu = find(docs, "Deployment", f"{PREFIX}-worker-gpu")
    assert gpu["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 700  # drain + 100 s of reports
    assert flag(gpu, "drain-timeout") == ["600"]
    general = find(docs, "Deployment", f"{PREFIX}-worker-general")
    assert general["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 400  # the 300 s default


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ({"existingSecret": None}, "none is set"),
        ({"existingSecret": ""}, "none is set"),
        ({"value": "s3cr3t"}, "token.value, token.existingSecret are all set"),
        ({"file": "/mnt/token"}, "token.existingSecret, token.file are all set"),
        (
            {"value": "s3cr3t", "file": "/mnt/token"},
            "token.value, token.existingSecret, token.file are all set",
        ),
    ],
)
def test_token_needs_exactly_one_source(chart, token, message):
    with pytest.raises(
        HelmRenderError, match="set exactly one of token.value, token.existingSecret or token.file"
    ) as e:
        render(chart, {"token": token})
    assert message in str(e.value)


def test_token_value_becomes_a_secret_and_a_token_file_mounts_none(chart):
    docs = render(chart, {"token": {"existingSecret": None, "value": "s3cr3t"}})
    secret = find(docs, "Secret", f"{PREFIX}-token")
    assert secret["data"] == {"token": "czNjcjN0"}
    worker = find(docs, "Deployment", f"{PREFIX}-worker-default")
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == f"{PREFIX}-token"
    assert "checksum/token" in worker["spec"]["template"]["metadata"]["annotations"]

    docs = render(chart, {"token": {"existingSecret": None, "file": "/mnt/secrets-store/agent-token"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert flag(deployment, "token-file") == ["/mnt/secrets-store/agent-token"]
        assert "token" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("which", ["defaults", "full example"])
def test_pods_are_non_root_with_a_read_only_root_and_probes_that_outlive_an_outage(chart, full_values, which):
    full = which == "full example"
    deployments = [d for d in render(chart, full_values if full else None) if d["kind"] == "Deployment"]
    assert len(deployments) == (5 if full else 2)
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 50000
        assert pod["securityContext"]["fsGroup"] == 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        box = container(deployment)
        assert box["securityContext"]["readOnlyRootFilesystem"] is True
        assert box["securityContext"]["allowPrivilegeEscalation"] is False
        assert box["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert flag(deployment, "health-port") == ["8080"]
        assert box["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
        # Only readiness follows the orchestrator: an outage must not restart agents and kill tasks.
        assert box["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        for probe in ("startupProbe", "livenessProbe"):
            assert box[probe]["httpGet"] == {"path": "/livez", "port": "health"}
        assert box["livenessProbe"]["failureThreshold"] * box["livenessProbe"]["periodSeconds"] >= 60
        # Where the agent and Airflow write, with the root filesystem read-only.
        mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        env = env_of(deployment)
        config_dir = str(Path(env["AIRFLOW_CONFIG"]).parent)
        for path in ("/tmp", f"{env['AIRFLOW_HOME']}/logs", config_dir):
            assert mounts.get(path) in emptydirs, path
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8080"
        assert annotations["prometheus.io/path"] == "/metrics"
        if full:
            assert annotations["team"] == "data-platform"
            assert deployment["spec"]["template"]["metadata"]["labels"]["cost-center"] == "analytics"
        labels = deployment["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels
        assert labels["helm.sh/chart"] == "airflow-remote-agent-0.1.0"


def test_security_settings_and_metrics_can_be_overridden(chart):
    values = {
        "metrics": {"enabled": False},
        "securityContext": {"readOnlyRootFilesystem": False},
        "healthPort": 9090,
        "podDisruptionBudget": {"enabled": False},
    }
    docs = render(chart, values)
    worker = find(docs, "Deployment", f"{PREFIX}-worker-default")
    assert "prometheus.io/scrape" not in worker["spec"]["template"]["metadata"].get("annotations", {})
    # Helm merges maps: the other settings stay.
    assert container(worker)["securityContext"]["readOnlyRootFilesystem"] is False
    assert container(worker)["securityContext"]["allowPrivilegeEscalation"] is False
    assert flag(worker, "health-port") == ["9090"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


def test_sentinel_watches_every_component_that_has_pods(chart, full_values):
    docs = render(chart, full_values)
    sentinel = find(docs, "Deployment", f"{PREFIX}-sentinel")
    assert container(sentinel)["args"][0] == "sentinel"
    watched = dict(w.split("=", 1) for w in flag(sentinel, "watch"))
    # The gpu group scales to zero: no pods is not unhealthy, so it is not watched.
    assert watched == {
        "worker-general": f"http://{PREFIX}-worker-general:8080/healthz",
        "dag-processor": f"http://{PREFIX}-dag-processor:8080/healthz",
        "triggerer": f"http://{PREFIX}-triggerer:8080/healthz",
    }
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for url in watched.values():
        assert re.match(r"http://([^:]+):", url).group(1) in services
    assert "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS" not in env_of(sentinel)

    no_sentinel = render(chart, {"sentinel": {"enabled": False}})
    assert ("Deployment", f"{PREFIX}-sentinel") not in kinds_and_names(no_sentinel)


def test_insecure_http_needs_the_explicit_switch(chart):
    docs = render(
        chart, {"orchestrator": {"url": "http://airflow.internal:8080/", "allowInsecureHttp": True}}
    )
    worker = find(docs, "Deployment", f"{PREFIX}-worker-default")
    assert flag(worker, "api-url") == ["http://airflow.internal:8080"]
    assert "--allow-insecure-http" in container(worker)["args"]
    default = find(render(chart), "Deployment", f"{PREFIX}-worker-default")
    assert "--allow-insecure-http" not in container(default)["args"]


def test_duplicate_or_overlong_group_names_fail(chart):
    same = {"workers": [{"name": "a", "queues": ["q"]}, {"name": "a", "queues": ["r"]}]}
    with pytest.raises(HelmError, match='the group name "a" is used twice'):
        render(chart, same)
    long_release = {"fullnameOverride": "x" * 40, "workers": [{"name": "y" * 20, "queues": ["q"]}]}
    with pytest.raises(HelmError, match="longer than 63 characters"):
        render(chart, long_release)


def test_dockerfile_installs_the_package_on_the_airflow_image():
    dockerfile = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert froms and all(f.startswith("apache/airflow:${AIRFLOW_VERSION}") for f in froms)
    assert re.search(r"^ARG AIRFLOW_VERSION=3\.\d+\.\d+$", dockerfile, re.MULTILINE)
    assert re.search(r"pip (wheel|install)[^\n]*/tmp/src", dockerfile)
    assert re.search(r'pip install[^\n]*"apache-airflow==\$\{AIRFLOW_VERSION\}"', dockerfile)
    assert re.search(r'^ENTRYPOINT \[.*"airflow-remote-agent"\]$', dockerfile, re.MULTILINE)
    assert re.search(r"^USER 50000", dockerfile, re.MULTILINE)
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!airflow_remote_exec/"):
        assert needed in dockerignore
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'airflow-remote-agent = "airflow_remote_exec.agent.main:main"' in pyproject
