"""What ships beside the code: Kubernetes manifests, the compose stack and the Dockerfile, checked offline.

Owns the invariants a user relies on when copying these files (schema-valid for pinned Kubernetes versions, a
locked-down sidecar probed on its admin port, config and credentials wired consistently); not the image build,
which .ci/image-check does for real.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"

# Pinned schemas: native sidecars need 1.29; the legacy variant must also hold on older clusters.
NATIVE_VERSIONS = ("1.29", "1.33")
LEGACY_VERSIONS = ("1.25", "1.29", "1.33")
# kubectl's built-in kustomize renders the kustomizations; Debian's kubernetes-client (1.20) is too old for
# components, so those tests skip without a recent kubectl even in CI.
RENDERED = {"example": "imsidecar-example.yaml", "example-legacy": "imsidecar-example-legacy.yaml"}
ADMIN_PORT = 9464
SCRAPE_JOB = "imsidecar"   # dashboards/prometheus/imsidecar-rules.yaml selects job="imsidecar"
SIDECAR_UID = 65532


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def rendered(variant: str) -> list[dict[str, Any]]:
    return load_all(K8S / RENDERED[variant])


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def sidecar(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "imsidecar"]
    assert len(found) == 1, "the pod must have exactly one imsidecar container"
    return found[0]


def strings(value: Any) -> Iterator[tuple[str, str]]:
    """(key, string) for every string value in a parsed YAML tree (comments are gone by then)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from ((key, item),) if isinstance(item, str) else strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def config_variables(config: dict[str, Any]) -> set[str]:
    return {name for _, text in strings(config) for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)}


def sidecar_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = one(docs, "ConfigMap")
    assert config_map["metadata"]["name"].startswith("imsidecar-config")
    return yaml.safe_load(config_map["data"]["config.yaml"])


# ----------------------------------------------------------------------------------------------------------------
# Schema


def schema_cases() -> Iterator[Any]:
    for variant, versions in (("example", NATIVE_VERSIONS), ("example-legacy", LEGACY_VERSIONS)):
        for version in versions:
            yield pytest.param(K8S / RENDERED[variant], version, id=f"{variant}-k8s{version}")
    for path in sorted((K8S / "app").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            yield pytest.param(path, LEGACY_VERSIONS[0], id=f"app/{path.name}")


@pytest.mark.parametrize(("path", "version"), list(schema_cases()))
def test_manifest_is_valid_for_pinned_kubernetes(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in load_all(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD, not in Kubernetes' schema; test_pod_monitor_scrapes_the_sidecar checks it
        kubernetes_validate.validate(doc, version, strict=True)


def test_native_sidecar_is_rejected_by_clusters_without_it() -> None:
    """The pinned schemas do tell the variants apart, so the legacy one is really needed before 1.29."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(one(rendered("example"), "Deployment"), "1.27", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_rendered_example_is_current(variant: str) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, check=True)
    assert list(yaml.safe_load_all(result.stdout)) == rendered(variant), (
        f"regenerate: kubectl kustomize deploy/kubernetes/{variant} > deploy/kubernetes/{RENDERED[variant]}"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_user_adds_sidecar_to_own_deployment_with_own_config(tmp_path: Path) -> None:
    """The flow deploy/README.md gives: label a Deployment, list the component, replace the config, set the image."""
    deployment = yaml.safe_load((K8S / "app" / "deployment.yaml").read_text(encoding="utf-8"))
    deployment["metadata"]["name"] = "their-app"
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    own = tmp_path / "imsidecar-config"
    own.mkdir()
    (own / "config.yaml").write_text("listen: 127.0.0.1:18080\nadmin_listen: 0.0.0.0:9464\napps: []\n")
    (own / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
        "configMapGenerator": [{"name": "imsidecar-config", "behavior": "replace", "files": ["config.yaml"]}],
    }))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["deployment.yaml"],
        "components": [os.path.relpath(K8S / "sidecar", tmp_path), "imsidecar-config"],
        "images": [{"name": "imsidecar", "newName": "registry.example.com/imsidecar", "newTag": "9.9.9"}],
    }))
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
    docs = list(yaml.safe_load_all(result.stdout))
    spec = pod_spec(docs)
    assert sidecar(spec)["image"] == "registry.example.com/imsidecar:9.9.9"
    assert sidecar_config(docs)["listen"] == "127.0.0.1:18080"
    config_volume = next(v for v in spec["volumes"] if v["name"] == "imsidecar-config")
    assert config_volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert sidecar_problems(spec, native=True) == []


# ----------------------------------------------------------------------------------------------------------------
# The sidecar's invariants


def sidecar_problems(spec: dict[str, Any], *, native: bool) -> list[str]:
    """Everything wrong with how the pod runs imsidecar; empty when the pod is as a user should get it."""
    container = sidecar(spec)
    problems = []
    in_init = any(c["name"] == "imsidecar" for c in spec.get("initContainers", []))
    if native and not (in_init and container.get("restartPolicy") == "Always"):
        problems.append("not a native sidecar (initContainers entry with restartPolicy: Always)")
    if not native and in_init:
        problems.append("legacy variant still uses an init container")
    problems += security_problems(container.get("securityContext", {}))
    problems += probe_problems(container)
    problems += resource_problems(container.get("resources", {}))
    if not any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])):
        problems.append("no writable /tmp for a read-only root filesystem")
    return problems


def security_problems(context: dict[str, Any]) -> list[str]:
    expected = {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return [f"securityContext.{key} is {context.get(key)!r}, want {want!r}"
            for key, want in expected.items() if context.get(key) != want]


def probe_problems(container: dict[str, Any]) -> list[str]:
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    problems = []
    if ports.get("metrics") != ADMIN_PORT:
        problems.append(f"admin port {ADMIN_PORT} is not declared as the port named 'metrics'")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or port != ADMIN_PORT:
            problems.append(f"{probe} is not GET {path} on the admin port")
    return problems


def resource_problems(resources: dict[str, Any]) -> list[str]:
    return [f"resources.{kind}.{name} is missing"
            for kind in ("requests", "limits") for name in ("cpu", "memory") if name not in resources.get(kind, {})]


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_sidecar_is_locked_down_and_probed_on_admin_port(variant: str) -> None:
    assert sidecar_problems(pod_spec(rendered(variant)), native=variant == "example") == []


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (lambda c: c.pop("restartPolicy"), "not a native sidecar"),
        (lambda c: c["securityContext"].update(runAsUser=0), "runAsUser"),
        (lambda c: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
        (lambda c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "capabilities"),
        (lambda c: c["livenessProbe"]["httpGet"].update(port=8080), "livenessProbe"),
        (lambda c: c["readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe"),
        (lambda c: c["resources"].pop("limits"), "resources.limits"),
    ],
)
def test_invariant_check_catches_a_weakened_sidecar(breakage: Any, problem: str) -> None:
    spec = copy.deepcopy(pod_spec(rendered("example")))
    breakage(sidecar(spec))
    assert any(problem in p for p in sidecar_problems(spec, native=True))


def test_native_and_legacy_sidecars_are_the_same_container() -> None:
    native = dict(sidecar(pod_spec(rendered("example"))))
    assert native.pop("restartPolicy") == "Always"
    assert native == sidecar(pod_spec(rendered("example-legacy")))


def test_sidecar_admin_port_matches_config() -> None:
    for variant in RENDERED:
        docs = rendered(variant)
        admin = sidecar_config(docs)["admin_listen"]
        assert admin == f"0.0.0.0:{ADMIN_PORT}", "probes and Prometheus reach the admin port from outside the pod"


# ----------------------------------------------------------------------------------------------------------------
# Config and credentials


def test_config_has_the_shape_the_sidecar_expects() -> None:
    config = yaml.safe_load((K8S / "sidecar" / "config.yaml").read_text(encoding="utf-8"))
    assert {"listen", "admin_listen", "apps"} <= set(config)
    assert config["apps"] and all({"name", "platform"} <= set(app) for app in config["apps"])
    assert {app["platform"] for app in config["apps"]} <= {"feishu", "lark", "dingtalk"}


def test_config_map_carries_the_config_file() -> None:
    config = yaml.safe_load((K8S / "sidecar" / "config.yaml").read_text(encoding="utf-8"))
    for variant in RENDERED:
        assert sidecar_config(rendered(variant)) == config


def test_config_loads_with_the_sidecar_loader(tmp_path: Path) -> None:
    """The real loader accepts the example once the Secret's env and files are there."""
    loader = pytest.importorskip("proxy.config", reason="the core's config loader is not on this branch yet")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "dingtalk-app-secret").write_text("placeholder-secret\n")
    text = (K8S / "sidecar" / "config.yaml").read_text(encoding="utf-8")
    text = text.replace("/etc/imsidecar/secrets/", f"{secrets_dir}/")
    env = {name: "placeholder" for name in config_variables(yaml.safe_load(text))}
    config = loader.loads(text, env)
    assert [app.name for app in config.apps] == ["feishu-bot", "dingtalk-bot"]


def test_every_config_variable_and_file_comes_from_the_secret() -> None:
    """`${VAR}` must be an env var of the sidecar from the Secret; `*_file` a path mounted from the Secret."""
    docs = rendered("example")
    spec, secret = pod_spec(docs), one(docs, "Secret")
    container = sidecar(spec)
    config = sidecar_config(docs)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert config_variables(config), "the example should show credentials from env"
    for name in config_variables(config):
        assert name in env, f"${{{name}}} is not set from a Secret in the sidecar"
        assert env[name]["name"] == secret["metadata"]["name"] and env[name]["key"] in secret["stringData"]
    files = [path for key, path in strings(config) if key.endswith("_file")]
    assert files, "the example should show a credential from a mounted file"
    for path in files:
        assert mounted_secret_key(spec, container, path) in secret["stringData"], f"{path} is not mounted"


def mounted_secret_key(spec: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]].get("secret")
        prefix = mount["mountPath"].rstrip("/") + "/"
        if volume and path.startswith(prefix):
            items = {i["path"]: i["key"] for i in volume.get("items", [])}
            return items.get(path[len(prefix):], None if items else path[len(prefix):])
    return None


def test_example_secret_holds_placeholders_only() -> None:
    secret = load_all(K8S / "app" / "secret.example.yaml")[0]
    assert "data" not in secret
    assert all(value.startswith("REPLACE_WITH_") for value in secret["stringData"].values())


def test_pod_monitor_scrapes_the_sidecar() -> None:
    for variant in RENDERED:
        docs = rendered(variant)
        monitor = one(docs, "PodMonitor")
        pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ports = {p["name"] for p in sidecar(pod_spec(docs))["ports"]}
        assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"])


def test_both_scrape_setups_use_the_job_name_the_rules_expect() -> None:
    monitors = [one(rendered(variant), "PodMonitor") for variant in RENDERED]
    for monitor in monitors:
        relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
        assert {"targetLabel": "job", "replacement": SCRAPE_JOB} in relabel
    compose_jobs = [job["job_name"] for job in yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"]]
    assert compose_jobs == [SCRAPE_JOB]
    rules = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"
    if rules.exists():
        assert set(re.findall(r'job="([^"]*)"', rules.read_text())) <= {SCRAPE_JOB}


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage; ARGs before the first FROM form stage 0."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def final_stage() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_stages()[-1]:
        found.setdefault(instruction, []).append(arguments)
    return found


def test_dockerfile_base_is_selectable_and_defaults_to_official_slim() -> None:
    preamble = dict(dockerfile_stages()[0])
    assert preamble["ARG"] == "BASE_IMAGE=python:3.11-slim-bookworm"
    assert all(s[0] == ("FROM", s[0][1]) and s[0][1].startswith("${BASE_IMAGE}") for s in dockerfile_stages()[1:])


def test_dockerfile_runs_as_numeric_non_root_user() -> None:
    (user,) = final_stage()["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == SIDECAR_UID


def test_dockerfile_has_healthcheck_on_admin_port_and_entrypoint() -> None:
    stage = final_stage()
    (healthcheck,) = stage["HEALTHCHECK"]
    assert f"127.0.0.1:{ADMIN_PORT}/healthz" in healthcheck and "python3" in healthcheck
    assert stage["EXPOSE"] == [f"8080 {ADMIN_PORT}"]
    assert stage["ENTRYPOINT"] == ['["imsidecar"]']
    assert stage["CMD"] == ['["run", "--config", "/etc/imsidecar/config.yaml"]']


def test_dockerfile_final_stage_takes_only_the_venv_and_no_secret() -> None:
    stage = final_stage()
    assert stage["COPY"] == ["--from=build /opt/imsidecar /opt/imsidecar"]
    assert "ADD" not in stage and "ARG" not in stage
    baked = " ".join(stage.get("ENV", []) + stage.get("LABEL", []))
    assert not re.search(r"secret|token|passw|api_?key|PIP_", baked, re.IGNORECASE)
    assert "PYTHONDONTWRITEBYTECODE=1" in baked


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*" and {"!pyproject.toml", "!README.md", "!proxy"} <= set(lines)


# ----------------------------------------------------------------------------------------------------------------
# Compose stack


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text(encoding="utf-8"))


def bind_mounts() -> Iterator[tuple[str, str, Path, str]]:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                yield name, source, (COMPOSE / source).resolve(), target


def test_compose_runs_demo_with_faults_beside_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"imsidecar", "prometheus", "grafana"}
    sidecar_service = services["imsidecar"]
    assert sidecar_service["build"]["context"] == "../.." and sidecar_service["command"][:2] == ["demo", "--faults"]
    assert sidecar_service["read_only"] is True and sidecar_service["user"].startswith(str(SIDECAR_UID))
    assert "imsidecar" in services["prometheus"]["depends_on"]
    assert "prometheus" in services["grafana"]["depends_on"]


def test_compose_mounts_the_shared_dashboard_files() -> None:
    sources = {source for _, source, _, _ in bind_mounts()}
    assert {
        "../../dashboards/prometheus/imsidecar-rules.yaml",
        "../../dashboards/grafana/provisioning/",
        "../../dashboards/imsidecar.json",
        "./prometheus.yml",
    } <= sources


@pytest.mark.parametrize(("service", "source", "path", "target"), list(bind_mounts()),
                         ids=[f"{m[0]}:{m[1]}" for m in bind_mounts()])
def test_compose_mount_exists(service: str, source: str, path: Path, target: str) -> None:
    if not path.exists() and path.is_relative_to(ROOT / "dashboards"):
        pytest.skip(f"{source} is produced by the dashboards work and is not on this branch")
    assert path.exists(), f"{service} mounts {source}, which does not exist"


def test_prometheus_scrapes_sidecar_admin_port_and_loads_mounted_rules() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert f"imsidecar:{ADMIN_PORT}" in targets
    rule_targets = [target for service, _, _, target in bind_mounts() if service == "prometheus" and "rules" in target]
    assert rule_targets and all(any(Path(t).match(glob) for glob in config["rule_files"]) for t in rule_targets)


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """promtool on prometheus.yml, with the rules file it mounts (when on this branch) where the container sees it."""
    promtool = require_binary("promtool", package="prometheus")
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    rules = [(path, target) for service, _, path, target in bind_mounts() if service == "prometheus" and "rules" in target]
    config["rule_files"] = [str(path) for path, _ in rules if path.exists()]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
