"""deploy/k8s and deploy/docker through scripts/k8s_check.py: the real overlays pass, deliberately broken copies fail
naming the problem. Renders with the real kubectl (from PyPI, cached in .tools/k8s)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k8s_check.py"

pytestmark = pytest.mark.slow  # about a second per rendered overlay; the first run downloads kubectl (38 MB)


@pytest.fixture(scope="module")
def k8s_check():
    spec = importlib.util.spec_from_file_location("k8s_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["k8s_check"]


@pytest.fixture(scope="module")
def kubectl(k8s_check) -> Path:
    return k8s_check.ensure_kubectl()


def broken_copy(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> Path:
    """deploy/k8s and deploy/docker copied under tmp_path with each file's ``old`` text replaced by ``new``."""
    for part in ("k8s", "docker"):
        shutil.copytree(ROOT / "deploy" / part, tmp_path / part)
    for name, (old, new) in edits.items():
        path = tmp_path / name
        text = path.read_text()
        assert old in text, f"{name} no longer holds {old!r}: update the test"
        path.write_text(text.replace(old, new, 1))
    return tmp_path


def run_check(k8s_check, kubectl: Path, root: Path, overlay: str = "cpu") -> tuple[bool, str]:
    lines, ok = k8s_check.check([root / "k8s" / "overlays" / overlay], kubectl, root / "docker" / "Dockerfile")
    return ok, "\n".join(line for line in lines if line.startswith("FAIL"))


TOOLS_PROBES = """          readinessProbe:
            grpc:
              port: 50052
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: 50052
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
"""
OPEN_KNOWLEDGE = """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: open-knowledge
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/component: knowledge
  ingress:
    - {}
"""
LIVENESS_PORT = "livenessProbe:\n            grpc:\n              port: "
POD_MONITOR = """apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: meshpilot
spec:
  selector: {}
"""
TOOLS_EGRESS_END = """          port: 50053
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: meshpilot-knowledge"""

BROKEN = {
    "container without probes": (
        {"k8s/base/tools.yaml": (TOOLS_PROBES, "")},
        ["Deployment/meshpilot-tools: container tools: no readinessProbe", "container tools: no livenessProbe"],
    ),
    "container running as root": (
        {"k8s/base/knowledge.yaml": ("runAsUser: 10001", "runAsUser: 0")},
        ["Deployment/meshpilot-knowledge: container knowledge: runs as root (runAsUser is 0)"],
    ),
    "runAsNonRoot off": (
        {"k8s/base/inference.yaml": ("runAsNonRoot: true", "runAsNonRoot: false")},
        ["container inference: runAsNonRoot is not true"],
    ),
    "writable root filesystem, privilege escalation, capabilities kept": (
        {
            "k8s/base/planner.yaml": (
                "allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n"
                '            capabilities:\n              drop: ["ALL"]',
                "readOnlyRootFilesystem: false",
            )
        },
        [
            "container planner: readOnlyRootFilesystem is not true",
            "container planner: allowPrivilegeEscalation is not false",
            "container planner: capabilities do not drop ALL",
        ],
    ),
    "no seccomp profile": (
        {"k8s/base/tools.yaml": ("        seccompProfile:\n          type: RuntimeDefault\n", "")},
        ["container tools: seccompProfile is not RuntimeDefault"],
    ),
    "schema error: unknown field": (
        {"k8s/base/inference.yaml": ("revisionHistoryLimit: 5", "revisionHistoryLimt: 5")},
        ["Deployment/meshpilot-inference: schema (Kubernetes 1.37): spec: Additional properties are not allowed"],
    ),
    "schema error: wrong type": (
        {"k8s/base/knowledge.yaml": ("  replicas: 2", "  replicas: two")},
        ["Deployment/meshpilot-knowledge: schema (Kubernetes 1.37): spec.replicas: 'two' is not of type"],
    ),
    "KEDA threshold as a number": (
        {"k8s/base/autoscaling.yaml": ('threshold: "4"', "threshold: 4")},
        ["ScaledObject/meshpilot-inference: schema (KEDA ScaledObject): spec.triggers.0.metadata.threshold"],
    ),
    "KEDA field of the HPA's spelling": (
        {"k8s/base/autoscaling.yaml": ("minReplicaCount: 1", "minReplicas: 1")},
        ["ScaledObject/meshpilot-inference: schema (KEDA ScaledObject): spec: Additional properties"],
    ),
    "Prometheus trigger without a query": (
        {
            "k8s/base/autoscaling.yaml": (
                "query: sum(meshpilot_engine_queue_depth",
                "qery: sum(meshpilot_engine_queue_depth",
            )
        },
        ["ScaledObject/meshpilot-inference: schema (KEDA ScaledObject): spec.triggers.0.metadata"],
    ),
    "knowledge open to everyone": (
        {"k8s/base/network-policies.yaml": ("---\n", "---\n" + OPEN_KNOWLEDGE.removeprefix("---\n") + "---\n")},
        ["Deployment/meshpilot-knowledge: NetworkPolicies let callers outside the namespace reach ports [50053"],
    ),
    "tools may call everything": (
        {"k8s/base/network-policies.yaml": (TOOLS_EGRESS_END, TOOLS_EGRESS_END.replace("\n---", "\n    - {}\n---"))},
        [
            "Deployment/meshpilot-tools: may send outside the namespace",
            "Deployment/meshpilot-planner: NetworkPolicies let Deployment/meshpilot-tools reach ports [50051]",
        ],
    ),
    "planner cannot reach inference": (
        {"k8s/base/network-policies.yaml": ("          port: 50054\n", "          port: 50055\n")},
        ["Deployment/meshpilot-inference: NetworkPolicies keep Deployment/meshpilot-planner from ports [50054]"],
    ),
    "a typo in the mesh config": (
        {"k8s/base/config/mesh.yaml": ("  threads: 2", "  thread: 2")},
        ["container inference: its config does not load: invalid configuration: inference.thread"],
    ),
    "a probe on a port nobody listens on": (
        {"k8s/base/planner.yaml": (LIVENESS_PORT + "50051", LIVENESS_PORT + "50055")},
        ["container planner: livenessProbe checks port 50055, health is served on 50051"],
    ),
    "a service bound to loopback": (
        {"k8s/base/config/mesh.yaml": ("    host: 0.0.0.0\n    port: 50053", "    host: 127.0.0.1\n    port: 50053")},
        ["container knowledge: knowledge.server.host 127.0.0.1 is loopback"],
    ),
    "approval key not mounted": (
        {"k8s/base/config/mesh.yaml": ("/etc/meshpilot/approval/approval.key", "/etc/meshpilot/approval.key")},
        ["container tools: approvals.key_file /etc/meshpilot/approval.key is no key of a mounted Secret"],
    ),
    "a typo in the service a container serves": (
        {"k8s/base/planner.yaml": ('args: ["planner"]', 'args: ["planer"]')},
        ["container planner: runs `meshpilot serve planer`"],
    ),
    "MESHPILOT_CONFIG naming a file nobody mounts": (
        {"k8s/base/tools.yaml": ("/etc/meshpilot/config/mesh.yaml", "/etc/meshpilot/mesh.yaml")},
        ["container tools: MESHPILOT_CONFIG '/etc/meshpilot/mesh.yaml' is not a file of a mounted ConfigMap"],
    ),
    "a kind nothing has a schema for": (
        {"k8s/base/network-policies.yaml": ("---\n", "---\n" + POD_MONITOR + "---\n")},
        ["PodMonitor/meshpilot: no schema for monitoring.coreos.com/v1 PodMonitor: nothing checks it"],
    ),
    "two autoscalers on one Deployment": (
        {
            "k8s/base/autoscaling.yaml": (
                "    name: meshpilot-tools\n  minReplicas: 1",
                "    name: meshpilot-knowledge\n  minReplicas: 1",
            )
        },
        [
            "Deployment/meshpilot-knowledge: scaled by HorizontalPodAutoscaler/meshpilot-knowledge and "
            "HorizontalPodAutoscaler/meshpilot-tools: they would fight"
        ],
    ),
    "an object so broken the other checks cannot read it": (
        {"k8s/base/autoscaling.yaml": ("    name: meshpilot-knowledge\n  minReplicas: 2", "  minReplicas: 2")},
        [
            "HorizontalPodAutoscaler/meshpilot-knowledge: schema (Kubernetes 1.37): spec.scaleTargetRef",
            "references: not checked: an object above breaks its schema (KeyError",
        ],
    ),
    "image of another user": (
        {"docker/Dockerfile": ("USER 10001:10001", "USER 10002:10002")},
        ["container planner: runs as uid 10001, the image's files belong to uid 10002"],
    ),
    "image running as root": (
        {"docker/Dockerfile": ("USER 10001:10001\n", "")},
        ["Dockerfile: the final stage runs as root"],
    ),
    "a Dockerfile that does not parse": (
        {"docker/Dockerfile": ('CMD ["planner"]', "RUN <<EOF")},
        ["Dockerfile: does not parse: unterminated heredoc"],
    ),
    "an instruction Docker does not know": (
        {"docker/Dockerfile": ("WORKDIR /src", "WRKDIR /src")},
        ["unknown instruction WRKDIR"],
    ),
    "an ENTRYPOINT in shell form": (
        {"docker/Dockerfile": ('ENTRYPOINT ["meshpilot", "serve"]', "ENTRYPOINT meshpilot serve")},
        ["Dockerfile: the final stage needs an ENTRYPOINT in exec form"],
    ),
    "COPY from a stage that does not exist": (
        {"docker/Dockerfile": ("COPY --from=builder", "COPY --from=bulider")},
        ["COPY --from=bulider names no earlier stage"],
    ),
}


def test_the_overlays_pass(k8s_check, kubectl) -> None:
    lines, ok = k8s_check.check(
        sorted(p.parent for p in (ROOT / "deploy/k8s/overlays").glob("*/kustomization.yaml")), kubectl
    )
    assert ok, "\n".join(lines)
    rendered = {line.split(":")[0] for line in lines}
    assert {"deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu", "deploy/k8s/overlays/cpu-postgres"} <= rendered


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_copy_fails_naming_the_problem(case: str, k8s_check, kubectl, tmp_path: Path) -> None:
    edits, expected = BROKEN[case]
    ok, failures = run_check(k8s_check, kubectl, broken_copy(tmp_path, edits))
    assert not ok
    for problem in expected:
        assert problem in failures, failures


def test_the_gpu_overlay_keeps_triton_in_the_namespace_and_reachable(k8s_check, kubectl, tmp_path: Path) -> None:
    root = broken_copy(tmp_path, {"k8s/overlays/gpu/kustomization.yaml": ("namespace: meshpilot\n", "")})
    ok, failures = run_check(k8s_check, kubectl, root, "gpu")
    assert not ok
    assert "Deployment/meshpilot-triton: not in the namespace meshpilot" in failures
    assert (
        "Deployment/meshpilot-triton: NetworkPolicies keep Deployment/meshpilot-inference from ports [8001]" in failures
    )


def test_the_database_url_is_checked_by_the_config_loader(k8s_check, kubectl, tmp_path: Path) -> None:
    dsn = "postgresql://meshpilot:REPLACE-ME@"
    root = broken_copy(tmp_path, {"k8s/components/postgres/kustomization.yaml": (dsn, "mysql://meshpilot:x@")})
    ok, failures = run_check(k8s_check, kubectl, root, "cpu-postgres")
    assert not ok
    assert "container planner: its config does not load" in failures
    assert "database_url must be a PostgreSQL URL" in failures
    assert "mysql://" not in failures  # the loader does not echo a DSN: it may hold a password


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_a_keda_query_that_does_not_parse_fails(k8s_check, kubectl, tmp_path: Path) -> None:
    query = 'sum(meshpilot_engine_queue_depth{namespace="meshpilot"})'
    root = broken_copy(tmp_path, {"k8s/base/autoscaling.yaml": (query, query.removesuffix(")"))})
    ok, failures = run_check(k8s_check, kubectl, root)
    assert not ok
    assert "ScaledObject/meshpilot-inference: triggers[0] query does not parse (promtool)" in failures


def test_an_overlay_that_does_not_render_fails(k8s_check, kubectl, tmp_path: Path) -> None:
    root = broken_copy(tmp_path, {"k8s/overlays/cpu/kustomization.yaml": ("../../base", "../../bsae")})
    ok, failures = run_check(k8s_check, kubectl, root)
    assert not ok
    assert "kubectl kustomize:" in failures


def test_the_command_exits_non_zero_with_a_line_per_problem(k8s_check, kubectl, tmp_path: Path) -> None:
    edits, expected = BROKEN["container running as root"]
    root = broken_copy(tmp_path, edits)
    command = [sys.executable, str(SCRIPT), "--kubectl", str(kubectl), "--dockerfile", str(root / "docker/Dockerfile")]
    failed = subprocess.run([*command, "--overlay", str(root / "k8s/overlays/cpu")], capture_output=True, text=True)
    assert failed.returncode == 1
    assert expected[0] in failed.stdout
    assert "k8s-check: FAILED" in failed.stderr
    passed = subprocess.run(command, capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.rstrip().endswith("k8s-check: passed")


# --- mutual TLS: components/mtls through overlays/cpu-mtls ---------------------------------------------------------------

MTLS = "k8s/components/mtls/"
TLS_MOUNT = "            - name: tls\n              mountPath: /etc/meshpilot/tls\n              readOnly: true\n"
HEALTH_OFFSET_ENV = '            - name: MESHPILOT_TLS__HEALTH_PORT_OFFSET\n              value: "2000"\n'
READINESS_PORT = "readinessProbe:\n            grpc:\n              port: "

MTLS_BROKEN = {
    "a Certificate without the service's spiffe URI": (
        {MTLS + "certificates.yaml": ('uris: ["spiffe://meshpilot/inference"]', 'uris: ["spiffe://other/inference"]')},
        ["tls: Certificate/meshpilot-inference-mtls (its inference.crt) does not name spiffe://meshpilot/inference"],
    ),
    "a Certificate without the DNS name callers check": (
        {MTLS + "certificates.yaml": ("    - knowledge\n", "")},
        ["tls: Certificate/meshpilot-knowledge-mtls lacks the DNS name knowledge: callers check it"],
    ),
    "a Certificate without client auth": (
        {MTLS + "certificates.yaml": ("server auth, client auth]", "server auth]")},
        ["tls: Certificate/meshpilot-planner-mtls usages lack client auth"],
    ),
    "a probe on the TLS port": (
        {MTLS + "deployments.yaml": (READINESS_PORT + "52052", READINESS_PORT + "50052")},
        [
            "container tools: readinessProbe checks port 50052, which serves TLS only and kubelet presents no certificate"
        ],
    ),
    "TLS on without the plaintext health port": (
        {MTLS + "deployments.yaml": (HEALTH_OFFSET_ENV, "")},
        ["container planner: tls is on without tls.health_port_offset"],
    ),
    "the certificate Secret not mounted at tls.cert_dir": (
        {MTLS + "deployments.yaml": (TLS_MOUNT, TLS_MOUNT.replace("/etc/meshpilot/tls", "/etc/meshpilot/certs"))},
        ["container planner: tls: /etc/meshpilot/tls/planner.crt is no file of a mounted Secret"],
    ),
    "the key under the wrong name": (
        {MTLS + "deployments.yaml": ("{key: tls.key, path: planner.key}", "{key: tls.key, path: planner.pem}")},
        ["tls: /etc/meshpilot/tls/planner.key is not among the items of Secret/meshpilot-planner-mtls"],
    ),
    "key files the service cannot read": (
        {MTLS + "deployments.yaml": ("defaultMode: 0440", "defaultMode: 0400")},
        ["tls: /etc/meshpilot/tls/planner.key has mode 0o400, owned by root: the service cannot read it"],
    ),
    "an Issuer reference to nothing": (
        {MTLS + "certificates.yaml": ("name: meshpilot-mtls-ca\n", "name: meshpilot-ca\n")},
        [
            "Certificate/meshpilot-planner-mtls: issuerRef names Issuer/meshpilot-ca, which is not in the render",
            "the services' Certificates come from different issuers",
        ],
    ),
    "a CA Issuer without its Secret": (
        {MTLS + "issuers.yaml": ("  ca:\n    secretName: meshpilot-mtls-ca", "  ca:\n    secretName: mesh-ca")},
        ["Issuer/meshpilot-mtls-ca: signs with Secret/mesh-ca, which no Certificate or Secret of the render holds"],
    ),
    "an unknown cert-manager field": (
        {MTLS + "certificates.yaml": ("renewBefore: 360h", "renewBefor: 360h")},
        ["Certificate/meshpilot-planner-mtls: schema (cert-manager Certificate): spec: Additional properties"],
    ),
    "renewal after expiry": (
        {MTLS + "certificates.yaml": ("renewBefore: 360h", "renewBefore: 2200h")},
        ["Certificate/meshpilot-planner-mtls: renewBefore 2200h is not below duration"],
    ),
    "the Ingress speaking plaintext to a TLS planner": (
        {MTLS + "kustomization.yaml": ("value: GRPCS", "value: GRPC")},
        ["Ingress/meshpilot-planner: nginx.ingress.kubernetes.io/backend-protocol is GRPC, Service/meshpilot-planner"],
    ),
}


def test_the_mtls_overlay_turns_tls_on_for_every_service(k8s_check, kubectl) -> None:
    objects = k8s_check.render(kubectl, ROOT / "deploy" / "k8s" / "overlays" / "cpu-mtls")
    assert k8s_check.check_rendered(objects, k8s_check.check_dockerfile()[1]) == []
    certificates = k8s_check.certificate_secrets(objects)
    for workload in k8s_check.workloads(objects):
        env = {e["name"]: e.get("value") for e in workload.spec["containers"][0]["env"]}
        assert env["MESHPILOT_TLS__ENABLED"] == "true", workload.ref
        secrets = [v["secret"]["secretName"] for v in workload.spec["volumes"] if "secret" in v]
        assert (
            f"meshpilot-{workload.component}-mtls" in secrets and f"meshpilot-{workload.component}-mtls" in certificates
        )


@pytest.mark.parametrize("case", sorted(MTLS_BROKEN))
def test_a_broken_mtls_copy_fails_naming_the_problem(case: str, k8s_check, kubectl, tmp_path: Path) -> None:
    edits, expected = MTLS_BROKEN[case]
    ok, failures = run_check(k8s_check, kubectl, broken_copy(tmp_path, edits), "cpu-mtls")
    assert not ok
    for line in expected:
        assert line in failures, f"{line!r} not in:\n{failures}"
