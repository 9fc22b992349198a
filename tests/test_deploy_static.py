"""Consistency of deploy/ with the code: entry points, settings, ports and routes.

`make check-deploy` validates the files against the Compose, Dockerfile and Kubernetes
rules. These tests cover what no schema can check, such as whether an image runs the
console script that the tests run, or whether every variable the manifests set is a setting.
"""

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_processes import SERVICES

from mensajero_common.settings import Settings
from mensajero_hub.transport.websocket import WS_PATH as HUB_WS_PATH

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_LOCAL = DEPLOY / "k8s" / "overlays" / "local"

# Image target → the console script it runs, as in `make run` and the cross-service tests.
SERVICE_TARGETS = {
    "api-gateway": "mensajero-api",
    "device-hub": "mensajero-hub",
    "dispatcher": "mensajero-dispatcher",
    "webhook-sender": "mensajero-webhooks",
}
# Image target → the setting of the port that serves its /healthz, /readyz and /metrics.
PORT_SETTINGS = {
    "api-gateway": "API_PORT",
    "device-hub": "HUB_PORT",
    "dispatcher": "DISPATCHER_OPS_PORT",
    "webhook-sender": "WEBHOOKS_OPS_PORT",
}
SETTING_NAMES = frozenset(Settings.model_fields)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Return the instructions of each named stage as (keyword, arguments) pairs."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", arguments, re.IGNORECASE)
            current = []
            if match:
                stages[match.group(1)] = current
        current.append((keyword, arguments.strip()))
    return stages


def instruction(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for name, arguments in stage if name == keyword]
    assert len(values) == 1, f"expected one {keyword}, found {values}"
    return values[0]


def entry_point(stage: list[tuple[str, str]]) -> list[str]:
    value = yaml.safe_load(instruction(stage, "ENTRYPOINT"))
    assert isinstance(value, list), "ENTRYPOINT must use the JSON (exec) form"
    return value


def package_scripts() -> dict[str, dict[str, str]]:
    """Return each workspace package's name → its [project.scripts]."""
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {}
    for member in workspace["tool"]["uv"]["workspace"]["members"]:
        project = tomllib.loads((ROOT / member / "pyproject.toml").read_text())
        packages[project["project"]["name"]] = project["project"].get("scripts", {})
    return packages


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {name: value for name, value in pairs}


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S_BASE.glob("*.yaml")):
        for document in yaml_documents(path):
            if document.get("kind") == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} named {name} in {K8S_BASE}")


def k8s_container(name: str) -> dict[str, Any]:
    deployment = k8s_resource("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def local_secret_literals() -> dict[str, str]:
    kustomization = yaml.safe_load((K8S_LOCAL / "kustomization.yaml").read_text())
    (secret,) = [
        item
        for item in kustomization["secretGenerator"]
        if item["name"] == "mensajero-secrets"
    ]
    return dict(literal.split("=", 1) for literal in secret["literals"])


def test_images_run_scripts_of_tests() -> None:
    stages = dockerfile_stages()

    entry_points = {target: entry_point(stages[target]) for target in SERVICE_TARGETS}

    assert {script for _, script in SERVICES} == set(SERVICE_TARGETS.values())
    for target, script in SERVICE_TARGETS.items():
        assert entry_points[target] == [script], target
    assert entry_point(stages["migrate"]) == ["mensajero-migrate"]


@pytest.mark.parametrize("target", [*SERVICE_TARGETS, "migrate"])
def test_image_script_in_synced_package(target: str) -> None:
    stages = dockerfile_stages()
    copy = instruction(stages[target], "COPY")
    venv_stage = re.search(r"--from=(\S+)", copy)
    assert venv_stage, copy
    sync = instruction(stages[venv_stage.group(1)], "RUN")
    package = re.search(r"--package\s+(\S+)", sync)
    assert package, sync
    assert "--frozen" in sync
    assert "--no-dev" in sync

    (script,) = entry_point(stages[target])

    assert script in package_scripts()[package.group(1)]


@pytest.mark.parametrize(("target", "port_setting"), PORT_SETTINGS.items())
def test_image_exposes_its_port(target: str, port_setting: str) -> None:
    stage = dockerfile_stages()[target]
    environment = instruction(stage, "ENV")

    port = re.search(rf"{port_setting}=(\d+)", environment)

    assert port, environment
    assert instruction(stage, "EXPOSE") == port.group(1)
    assert port_setting in instruction(stage, "HEALTHCHECK")
    assert "/healthz" in instruction(stage, "HEALTHCHECK")


def test_image_environment_names_are_settings() -> None:
    for target, stage in dockerfile_stages().items():
        for keyword, arguments in stage:
            if keyword != "ENV" or target.startswith(("workspace", "runtime")):
                continue
            names = set(re.findall(r"(\w+)=", arguments))
            assert names <= SETTING_NAMES, f"{target}: {names - SETTING_NAMES}"


def test_compose_settings_are_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    names = set(compose["x-settings"])

    assert names <= SETTING_NAMES, names - SETTING_NAMES
    for service in (*SERVICE_TARGETS, "migrate"):
        assert compose["services"][service]["environment"] == compose["x-settings"]


def test_compose_services_wait_for_migrations() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    for service in SERVICE_TARGETS:
        depends_on = compose["services"][service]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert compose["services"][service]["build"]["target"] == service


def test_k8s_config_names_are_settings() -> None:
    config = env_file(K8S_BASE / "config.env")
    secrets = local_secret_literals()

    assert set(config) <= SETTING_NAMES, set(config) - SETTING_NAMES
    assert set(secrets) <= SETTING_NAMES, set(secrets) - SETTING_NAMES


def test_k8s_config_loads_as_settings() -> None:
    config = env_file(K8S_BASE / "config.env")
    local = {**config, **local_secret_literals(), "ENVIRONMENT": "development"}
    production = {
        **config,
        "SECRET_KEY": "a-secret-value-of-at-least-32-bytes",
        "FIRST_SUPERUSER_PASSWORD": "another-secret-value",
    }

    # model_validate reads only the given values, not the environment or a .env file.
    local_settings = Settings.model_validate(local)
    production_settings = Settings.model_validate(production)

    assert local_settings.API_HOST == "0.0.0.0"
    assert production_settings.is_production


@pytest.mark.parametrize(("deployment", "port_setting"), PORT_SETTINGS.items())
def test_k8s_container_port_matches_config(deployment: str, port_setting: str) -> None:
    config = env_file(K8S_BASE / "config.env")

    (port,) = k8s_container(deployment)["ports"]

    assert port["containerPort"] == int(config[port_setting])


@pytest.mark.parametrize("deployment", SERVICE_TARGETS)
def test_k8s_probes_use_health_endpoints(deployment: str) -> None:
    container = k8s_container(deployment)
    (port,) = container["ports"]
    pod = k8s_resource("Deployment", deployment)["spec"]["template"]["metadata"]

    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]

    assert readiness == {"path": "/readyz", "port": port["name"]}
    assert liveness == {"path": "/healthz", "port": port["name"]}
    assert pod["annotations"]["prometheus.io/port"] == str(port["containerPort"])


def test_websocket_path_routes_to_hub() -> None:
    hub_path = HUB_WS_PATH
    ingress = k8s_resource("Ingress", "device-hub")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    nginx = (DEPLOY / "nginx" / "mensajero.conf").read_text()

    assert path["path"] == hub_path
    assert path["backend"]["service"]["name"] == "device-hub"
    assert f"location = {hub_path} {{" in nginx
    assert re.search(
        rf"location = {re.escape(hub_path)} \{{\s*proxy_pass \$device_hub;", nginx
    )


def _ingress_routes(paths: list[dict[str, Any]], url_path: str) -> bool:
    """Tell whether one of an Ingress rule's paths matches `url_path`, as Kubernetes does."""
    for path in paths:
        if path["pathType"] == "Exact" and url_path == path["path"]:
            return True
        prefix = path["path"].rstrip("/")
        if path["pathType"] == "Prefix" and (
            url_path == prefix or url_path.startswith(prefix + "/")
        ):
            return True
    return False


@pytest.mark.parametrize(
    ("url_path", "published"),
    [
        ("/api/v1/sms/send", True),
        ("/api/v1/login/access-token", True),
        ("/docs", True),
        ("/docs/oauth2-redirect", True),
        ("/redoc", True),
        ("/openapi.json", True),
        ("/metrics", False),
        ("/healthz", False),
        ("/readyz", False),
        ("/apikeys", False),
    ],
)
def test_api_ingress_publishes_only_api(url_path: str, published: bool) -> None:
    ingress = k8s_resource("Ingress", "api-gateway")
    (rule,) = ingress["spec"]["rules"]

    assert _ingress_routes(rule["http"]["paths"], url_path) is published


def compose_default(value: str) -> str:
    """Return the default of a Compose value written as "${NAME:-default}"."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    assert match, f"{value!r} is not ${{NAME:-default}}"
    return match.group(1)


def test_nginx_replaces_forwarded_for() -> None:
    nginx = (DEPLOY / "nginx" / "mensajero.conf").read_text()

    values = re.findall(r"proxy_set_header X-Forwarded-For (\S+);", nginx)

    # One per location that proxies: the device WebSocket and the API.
    assert values == ["$remote_addr", "$remote_addr"]


def test_proxy_trust_excludes_public_peers() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose_value = compose_default(compose["x-settings"]["FORWARDED_ALLOW_IPS"])
    k8s_value = env_file(K8S_BASE / "config.env")["FORWARDED_ALLOW_IPS"]

    for value in (compose_value, k8s_value):
        trusted = Settings.model_validate({"FORWARDED_ALLOW_IPS": value})
        networks = [
            ipaddress.ip_network(entry)
            for entry in trusted.FORWARDED_ALLOW_IPS.split(",")
        ]
        assert networks, value
        for network in networks:
            assert network.is_private, f"{network} in {value} is not private"
