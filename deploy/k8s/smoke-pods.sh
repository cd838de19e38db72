#!/usr/bin/env bash
# The cpu overlay's four pods without a cluster or an image: each service runs from .venv as uid 10001 under a
# read-only root (bubblewrap), with only the volumes its Deployment mounts (the rendered ConfigMap, the approval key
# laid out as a Secret volume lays it out, its data volume, /tmp), all in one network namespace where the Services'
# names resolve to loopback. Waits for gRPC health, creates an API key the way the README says (`meshpilot keys
# create` in the planner's pod), asks a question with and without it. Needs root (ip netns), bwrap, `make install`.
#   sudo bash deploy/k8s/smoke-pods.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=$REPO/.venv/bin/python
WORK=$(mktemp -d /tmp/meshpilot-smoke-pods.XXXXXX)
NS=meshpilot-smoke-$$
UID_GID=10001
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "/etc/netns/$NS"
  rmdir /etc/meshpilot/config /etc/meshpilot/approval /etc/meshpilot /var/lib/meshpilot 2>/dev/null || true
}
trap cleanup EXIT

KUBECTL=$($PY -c "import sys; sys.path.insert(0, '$REPO/scripts'); import k8s_check; print(k8s_check.ensure_kubectl())")
mkdir -p "$WORK/config" "$WORK/logs"
"$KUBECTL" kustomize "$REPO/deploy/k8s/overlays/cpu" | $PY -c "
import sys, yaml
config = next(o for o in yaml.safe_load_all(sys.stdin) if o and o['kind'] == 'ConfigMap')
open('$WORK/config/mesh.yaml', 'w').write(config['data']['mesh.yaml'])"
# A Secret volume: the file is a symlink through ..data to a timestamped directory, read-only, group fsGroup.
version="$WORK/approval/..2026_01_01_00_00_00.000000001"
mkdir -p "$version"
$PY -c "import secrets; print(secrets.token_hex(32))" > "$version/approval.key"
ln -s "$(basename "$version")" "$WORK/approval/..data"
ln -s ..data/approval.key "$WORK/approval/approval.key"
chgrp -R $UID_GID "$version"; chmod 0440 "$version/approval.key"; chmod 0755 "$WORK" "$WORK/approval" "$version"
for service in planner tools knowledge inference; do
  mkdir -p "$WORK/data-$service" "$WORK/tmp-$service"
  chown $UID_GID:$UID_GID "$WORK/data-$service" "$WORK/tmp-$service"
done
# Mount points on the host's (otherwise untouched, read-only inside) root; removed again on exit.
mkdir -p /etc/meshpilot/config /etc/meshpilot/approval /var/lib/meshpilot "/etc/netns/$NS"
echo "127.0.0.1 localhost meshpilot-planner meshpilot-tools meshpilot-knowledge meshpilot-inference" > "/etc/netns/$NS/hosts"
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

pod() {  # pod SERVICE COMMAND...: COMMAND in SERVICE's pod
  local service=$1; shift
  local mounts=(--ro-bind "$WORK/config" /etc/meshpilot/config --bind "$WORK/tmp-$service" /tmp)
  case $service in planner|tools) mounts+=(--ro-bind "$WORK/approval" /etc/meshpilot/approval);; esac
  case $service in planner|tools|knowledge) mounts+=(--bind "$WORK/data-$service" /var/lib/meshpilot);; esac
  # /root is private on these machines and .venv's interpreter lives under it: only that is made visible.
  ip netns exec "$NS" bwrap --ro-bind / / --tmpfs /root --ro-bind-try /root/.pyenv /root/.pyenv --unshare-pid \
      --dev /dev --proc /proc "${mounts[@]}" --chdir /var/lib/meshpilot --die-with-parent \
    setpriv --reuid $UID_GID --regid $UID_GID --groups $UID_GID --inh-caps=-all --bounding-set=-all \
    env -i PATH="$REPO/.venv/bin:/usr/bin:/bin" HOME=/tmp XDG_CACHE_HOME=/tmp/.cache HF_HOME=/tmp/.cache/huggingface \
      HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MESHPILOT_DATA_DIR=/var/lib/meshpilot \
      MESHPILOT_CONFIG=/etc/meshpilot/config/mesh.yaml MESHPILOT_API_KEY="${MESHPILOT_API_KEY:-}" "$@"
}

for service in knowledge inference tools planner; do
  pod "$service" meshpilot serve "$service" > "$WORK/logs/$service.log" 2>&1 &
  PIDS+=($!)
done
serving() {
  ip netns exec "$NS" "$PY" -c "
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
for port in (50051, 50052, 50053, 50054):
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        raise SystemExit(1)
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(1)"
}
for _ in $(seq 1 150); do
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "FAIL: a service exited; logs in $WORK/logs" >&2; tail -n 5 "$WORK"/logs/*.log >&2; exit 1; }
  done
  serving && break
  sleep 2
done
serving || { echo "FAIL: not all SERVING after 300 s; logs in $WORK/logs" >&2; exit 1; }
echo "all four services SERVING as uid $UID_GID with a read-only root"

key=$(pod planner meshpilot keys create --tenant smoke --name smoke-pods --json | $PY -c "import json, sys; print(json.load(sys.stdin)['key'])")
if pod planner meshpilot ask --planner meshpilot-planner:50051 "What is the capital of France?" > "$WORK/logs/ask-without-key.txt" 2>&1; then
  echo "FAIL: the planner answered a call without an API key" >&2; exit 1
fi
echo "without a key: refused ($(grep -o 'UNAUTHENTICATED' "$WORK/logs/ask-without-key.txt" | head -1))"
answer=$(MESHPILOT_API_KEY=$key pod planner meshpilot ask --json --planner meshpilot-planner:50051 "What is the capital of France?")
echo "with a key: $($PY -c "import json, sys; print(json.loads(sys.argv[1])['answer'])" "$answer")"
echo "written outside the volumes: none (the root is read-only); on them:"
(cd "$WORK" && find data-* -mindepth 1 -maxdepth 1 | sort)
echo "logs: $WORK/logs"
