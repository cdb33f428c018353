"""The Helm chart, rendered with its default and production values, read as manifests."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.settings import SERVICE_REQUIRED
from processor.topology import shard_queue_names
from tests.deploy.manifests import (
    CHART,
    PRODUCTION_VALUES,
    ROLES,
    declared_queues,
    exported_metrics,
    metrics_in,
    render,
    settings_variables,
    values,
)

VALUE_SETS = {"default": (), "production": (PRODUCTION_VALUES,)}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, helm: str) -> tuple[str, list[dict[str, Any]]]:
    paths: tuple[Path, ...] = VALUE_SETS[request.param]
    return request.param, render(helm, *paths)


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in _kind(docs, "Deployment")
    }


def _shards(docs: list[dict[str, Any]]) -> int:
    (config,) = _kind(docs, "ConfigMap")[:1]
    return int(config["data"]["M365SYNC_SHARDS"])


def test_every_role_runs_the_one_image_with_its_role_as_argument(rendered):
    """There is one Deployment per role, each running the same image with `m365sync <role>`."""
    _, docs = rendered
    deployments = _deployments(docs)
    assert sorted(deployments) == sorted(ROLES)
    images = set()
    for role, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [role]
        images.add(container["image"])
    assert len(images) == 1


def test_every_role_has_probes_resources_and_a_locked_down_security_context(rendered):
    """Each role has liveness and readiness probes, requests and limits, and runs non-root on a read-only root filesystem without privileges."""
    _, docs = rendered
    for role, deployment in _deployments(docs).items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            action = container[probe]["httpGet"]
            assert action["port"] in ports, (role, probe)
        if role == "receiver":
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (role, kind)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False


def test_keda_scales_workers_and_outbound_on_exactly_the_shard_queues_the_code_declares(rendered):
    """Each ScaledObject's queue pattern matches exactly its role's shard queues among every queue `declare_topology` declares, and never more replicas than shards."""
    _, docs = rendered
    shards = _shards(docs)
    declared = declared_queues(shards)
    deployments = {d["metadata"]["name"]: d for d in _kind(docs, "Deployment")}
    scaled = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: s
        for s in _kind(docs, "ScaledObject")
    }
    assert sorted(scaled) == ["outbound", "worker"]
    for role, queues in (("worker", "inbound"), ("outbound", "outbound")):
        spec = scaled[role]["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert target["metadata"]["labels"]["app.kubernetes.io/component"] == role
        assert "replicas" not in target["spec"]  # KEDA owns the count
        assert spec["maxReplicaCount"] <= shards
        matched: set[str] = set()
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "rabbitmq"
            if meta.get("useRegex") == "true":
                assert meta["operation"] == "sum"
                pattern = re.compile(meta["queueName"])
                matched |= {name for name in declared if pattern.search(name)}
            else:
                matched.add(meta["queueName"])
        assert matched == set(shard_queue_names(queues, shards))
        for name in matched:  # the shard queues the consumers read, quorum ones
            assert declared[name]["x-queue-type"] == "quorum"


def test_every_setting_is_set_or_documented_and_secrets_are_only_referenced(rendered):
    """Every variable the settings read is in the ConfigMap, a Secret reference or the documented defaults; required ones are set; no Secret is rendered."""
    name, docs = rendered
    chart_values = values(*VALUE_SETS[name])
    (config,) = _kind(docs, "ConfigMap")[:1]
    assert not _kind(docs, "Secret")
    secret_name = chart_values["secrets"]["existingSecret"]
    for deployment in _deployments(docs).values():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        secret_env, plain_env = set(), {}
        for env in container["env"]:
            if "value" in env:  # only the path of the mounted certificate is not a Secret
                plain_env[env["name"]] = env["value"]
                continue
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret_name
            secret_env.add(env["name"])
        assert set(plain_env) <= {"M365SYNC_CLIENT_CERTIFICATE_PATH"}
        configured = set(config["data"]) | secret_env | set(plain_env)
        documented = set(chart_values["documentedDefaults"])
        missing = settings_variables() - configured - documented
        assert not missing, f"set or document in values.yaml: {sorted(missing)}"
        required = set(SERVICE_REQUIRED)
        if "M365SYNC_CLIENT_CERTIFICATE_PATH" in plain_env:
            # The certificate replaces the secret, and is a file mounted from a Secret.
            required.discard("M365SYNC_CLIENT_SECRET")
            assert "M365SYNC_CLIENT_SECRET" not in configured
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            directory = plain_env["M365SYNC_CLIENT_CERTIFICATE_PATH"].rsplit("/", 1)[0]
            assert mounts[directory]["readOnly"] is True
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "secret" in volumes[mounts[directory]["name"]]
        assert configured >= required
        assert not secret_env & set(config["data"])
    assert config["data"]["M365SYNC_METRICS_HOST"] == "0.0.0.0"
    assert config["data"]["M365SYNC_LOG_FORMAT"] == "json"


def test_a_secret_placed_in_config_is_refused(helm):
    """Rendering fails when a secret variable is put in the plain ConfigMap values."""
    result = subprocess.run(
        [helm, "template", "m", str(CHART), "--set", "config.M365SYNC_MASTER_KEYS=k1:AAAA"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "M365SYNC_MASTER_KEYS is a secret" in result.stderr


def test_with_a_certificate_the_client_secret_is_not_passed(helm):
    """Configuring the certificate mounts it and drops the client secret from every pod (the service refuses both)."""
    docs = render(helm, extra=("--set", "clientCertificate.existingSecret=cert"))
    for deployment in _deployments(docs).values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        names = {env["name"] for env in container["env"]}
        assert "M365SYNC_CLIENT_CERTIFICATE_PATH" in names
        assert "M365SYNC_CLIENT_SECRET" not in names


def test_too_many_replicas_for_the_shards_is_refused(helm):
    """Rendering fails when KEDA could start more workers than there are shard queues."""
    result = subprocess.run(
        [helm, "template", "m", str(CHART), "--set", "autoscaling.worker.maxReplicaCount=9"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "exceeds the shard count" in result.stderr


def test_receiver_is_exposed_and_every_role_has_a_budget_and_a_network_policy(rendered):
    """The receiver has a Service and an Ingress without /metrics; each role a PodDisruptionBudget and a NetworkPolicy selecting exactly its pods."""
    _, docs = rendered
    deployments = _deployments(docs)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selectors = {
            d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"].get(
                "selector", d["spec"].get("podSelector")
            )
            for d in _kind(docs, kind)
        }
        assert sorted(selectors) == sorted(ROLES), kind
        for role, selector in selectors.items():
            pod_labels = deployments[role]["spec"]["template"]["metadata"]["labels"]
            assert selector["matchLabels"].items() <= pod_labels.items()
    services = {s["metadata"]["name"]: s for s in _kind(docs, "Service")}
    (ingress,) = _kind(docs, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {p["backend"]["service"]["name"] for p in paths} <= set(services)
    assert "/graph" in {p["path"] for p in paths}
    assert not any(p["path"].startswith("/metrics") for p in paths)
    assert ingress["spec"]["tls"]


def test_alerts_and_dashboard_read_only_metrics_the_code_exports(rendered):
    """Every m365sync metric in the PrometheusRule and the Grafana dashboard is registered by the code, and the five required alerts exist."""
    _, docs = rendered
    (rule,) = _kind(docs, "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    known = exported_metrics()
    for alert in rules:
        used = metrics_in(alert["expr"])
        assert used, alert["alert"]
        assert used <= known, (alert["alert"], sorted(used - known))
        assert alert["annotations"]["runbook_url"]
    names = {r["alert"] for r in rules}
    assert {
        "M365SyncSubscriptionsExpiring",
        "M365SyncDeadLettersGrowing",
        "M365SyncReauthorizationWave",
        "M365SyncInboundLagHigh",
        "M365SyncGraphThrottling",
    } <= names
    dashboards = [
        d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    ]
    (dashboard,) = dashboards
    panels = json.loads(dashboard["data"]["m365sync.json"])["panels"]
    for panel in panels:
        for target in panel["targets"]:
            assert metrics_in(target["expr"]) <= known, (panel["title"], target["expr"])
    (monitor,) = _kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_runbook_links_of_the_alerts_exist():
    """Each alert's runbook anchor is a heading of docs/runbook.md."""
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    anchors = set(re.findall(r"runbook_url: .*#([a-z0-9-]+)", text))
    runbook = (CHART.parents[2] / "docs" / "runbook.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    assert anchors
    assert anchors <= headings, sorted(anchors - headings)


def test_data_residency_is_declared_in_production_values():
    """The production values name the database's region and jurisdiction, and the pods carry them."""
    production = yaml.safe_load(PRODUCTION_VALUES.read_text())["dataResidency"]
    assert production["region"]
    assert production["jurisdiction"] == "EU"
