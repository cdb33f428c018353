"""deploy/compose.yaml parsed: the laptop stack has every part, and every setting is set or documented."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from processor.settings import SERVICE_REQUIRED
from tests.deploy.manifests import COMPOSE, ROLES, settings_variables


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_role_is_a_service_of_the_one_image(compose):
    """Each role runs `m365sync <role>` from the image built by deploy/Dockerfile, non-root and read-only."""
    services = compose["services"]
    for role in ROLES:
        service = services[role]
        assert service["command"] == [role]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == services["receiver"]["image"]
        assert service["read_only"] is True
        assert not service["user"].startswith("0")
        assert service["healthcheck"]["test"]


def test_every_setting_is_set_or_documented_for_each_role(compose):
    """Every variable the settings read is set in each role's environment or named in x-documented-defaults; the required ones are set."""
    documented = set(compose["x-documented-defaults"])
    for role in ROLES:
        env = compose["services"][role]["environment"]
        missing = settings_variables() - set(env) - documented
        assert not missing, (role, sorted(missing))
        assert set(env) >= SERVICE_REQUIRED
        # Keys come from deploy/.env (made by deploy/laptop-env.sh), never from this file.
        for name in ("M365SYNC_MASTER_KEYS", "M365SYNC_HASH_KEY", "M365SYNC_CONNECT_SECRET"):
            assert re.fullmatch(r"\$\{" + name + r":\?.+\}", env[name]), name


def test_broker_replica_set_simulator_and_demo_are_there(compose):
    """RabbitMQ, a three-member replica set initiated by a one-shot service, the simulator and the demo profile are all defined and wired."""
    services = compose["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    members = [name for name, s in services.items() if "--replSet" in (s.get("command") or [])]
    assert len(members) == 3
    init = " ".join(services["mongo-init"]["command"])
    for member in members:
        assert f'host: "{member}:27017"' in init
    url = urlsplit(services["worker"]["environment"]["M365SYNC_MONGODB_URL"])
    assert sorted(h.split(":")[0] for h in url.netloc.split(",")) == sorted(members)
    assert "replicaSet=rs0" in url.query
    assert services["graphsim"]["entrypoint"] == ["graphsim"]
    assert services["demo"]["command"] == ["demo"]
    assert services["demo"]["profiles"] == ["demo"]
    for role in ROLES:
        depends = services[role]["depends_on"]
        assert depends["mongo-init"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"


def test_roles_sharing_a_namespace_do_not_share_a_metrics_port(compose):
    """The roles share the simulator's network namespace, so each listens for metrics on a port of its own."""
    ports = [compose["services"][role]["environment"]["M365SYNC_METRICS_PORT"] for role in ROLES]
    assert len(set(ports)) == len(ports)
