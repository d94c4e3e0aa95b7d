#!/usr/bin/env bash
# The seed scenario end to end in loopback mode, without privileges: real agents and Envoys
# enforce the article's policies across two clusters joined by Cluster Mesh (an etcd each);
# each pod is a process on its own 127.x address.
#   billing-service (cluster-a) x2 : servers on 127.0.1.10 / 127.0.1.11, port 18080
#   Envoy                          : listens for them on 127.0.1.10:8080 / 127.0.1.11:8080
#   frontend-service (cluster-b)   : curl from 127.0.2.55
#   reporting-job (other labels)   : curl from 127.0.2.60
# Exits non-zero if any request gets a status other than the article's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

L7GATE=$PWD/.venv/bin/l7gate
ENGINE=${L7G_ENGINE:-envoy}  # the L7 proxy: envoy, or h11 (`make demo ENGINE=h11`)
PY=$PWD/.venv/bin/python
work=$(mktemp -d /tmp/l7g-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The article's two clusters, joined by Cluster Mesh: one etcd and one agent per cluster. Each
# agent is told about its own cluster's pods only and merges the other cluster's from its etcd.
read -r ca_client ca_peer cb_client cb_peer < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
start_etcd() {  # name client-port peer-port
    etcd --name "$1" --data-dir "$work/etcd-$1" --logger zap --log-outputs stderr \
        --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
        --listen-peer-urls "http://127.0.0.1:$3" --initial-advertise-peer-urls "http://127.0.0.1:$3" \
        --initial-cluster "$1=http://127.0.0.1:$3" --initial-cluster-token "l7g-demo-$1-$$" \
        2> "$work/etcd-$1.log" &
    pids+=($!)
    for _ in $(seq 100); do
        curl -s --max-time 1 "http://127.0.0.1:$2/health" | grep -q '"health":"true"' && return 0
        sleep 0.1
    done
    cat "$work/etcd-$1.log"; exit 1
}
start_etcd cluster-a "$ca_client" "$ca_peer"
start_etcd cluster-b "$cb_client" "$cb_peer"
echo "== cluster mesh: cluster-a's etcd on 127.0.0.1:$ca_client, cluster-b's on 127.0.0.1:$cb_client"

agent_config() {  # cluster id own-etcd-port remote remote-etcd-port
    mkdir -p "$work/$1/mesh"
    printf 'endpoints: ["http://127.0.0.1:%s"]\n' "$5" > "$work/$1/mesh/$4"
    cat > "$work/$1/agent.yaml" <<CFG
node: $1-node1
cluster: {name: $1, id: $2}
stateDir: $work/$1/state
admin: {listen: "unix:$work/$1/admin.sock"}
envoy: {logLevel: warning}
proxy: {engine: $ENGINE}
clustermesh: {etcd: {endpoints: ["http://127.0.0.1:$3"]}, configDir: "$work/$1/mesh"}
CFG
}
agent_config cluster-a 1 "$ca_client" cluster-b "$cb_client"
agent_config cluster-b 2 "$cb_client" cluster-a "$ca_client"
A="unix:$work/cluster-a/admin.sock"
B="unix:$work/cluster-b/admin.sock"
export L7GATE_ADMIN="$A"

for c in cluster-a cluster-b; do
    echo "== starting the $c agent (loopback mode): l7gate agent --config $c/agent.yaml"
    "$L7GATE" agent --config "$work/$c/agent.yaml" 2> "$work/$c/agent.log" &
    pids+=($!)
    for _ in $(seq 100); do
        "$L7GATE" status --admin "unix:$work/$c/admin.sock" >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$L7GATE" status --admin "unix:$work/$c/admin.sock" >/dev/null || { cat "$work/$c/agent.log"; exit 1; }
done

for ip in 127.0.1.10 127.0.1.11; do
    "$PY" scripts/pod_server.py --listen "$ip:18080" --name "payments/billing-service@$ip" > /dev/null &
    pids+=($!)
done

# Each cluster's pods, from the one inventory (by their l7gate.io/cluster annotation).
"$PY" - "$work" <<'SPLIT'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("examples/loopback/inventory.yaml")) if d]
for cluster in ("cluster-a", "cluster-b"):
    mine = [d for d in docs if d["kind"] == "Namespace"
            or d["metadata"].get("annotations", {}).get("l7gate.io/cluster") == cluster]
    yaml.safe_dump_all(mine, open(f"{sys.argv[1]}/{cluster}/pods.yaml", "w"))
SPLIT
for c in cluster-a cluster-b; do
    echo "== $c: l7gate endpoint apply -f (its own pods, from examples/loopback/inventory.yaml)"
    "$L7GATE" endpoint apply -f "$work/$c/pods.yaml" --admin "unix:$work/$c/admin.sock"
    "$L7GATE" policy apply -f examples/seed --admin "unix:$work/$c/admin.sock" >/dev/null 2>&1
done
echo "== cluster-a: l7gate clustermesh status --wait"
"$L7GATE" clustermesh status --wait --wait-timeout 60
echo "== cluster-a: l7gate endpoint list (cluster-b's pods came from cluster-b's etcd)"
"$L7GATE" endpoint list

# Wait until the L7 proxy enforces the configuration: Envoy has acknowledged it, or the h11
# engine listens on every proxied port.
for _ in $(seq 100); do
    [ "$ENGINE" = h11 ] && "$L7GATE" status -o json | "$PY" -c '
import json, sys
p = json.load(sys.stdin)["proxy"]
sys.exit(0 if p["ports"] and p["listeners"] == p["ports"] else 1)' && break
    "$L7GATE" xds status -o json | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
rows = [t for n in d["nodes"] for t in n["types"].values() if t["type"] in ("LDS", "RDS", "CDS")]
sys.exit(0 if len(rows) == 3 and all(r["state"] == "SYNCED" for r in rows) else 1)' && break
    sleep 0.1
done

failed=0
call() {
    local expect=$1 src=$2 method=$3 path=$4 what=$5
    local code
    code=$(curl -s -o "$work/body" -w '%{http_code}' --interface "$src" -X "$method" \
        -H 'Host: billing-service.payments' --max-time 5 \
        "http://127.0.1.10:8080$path" -d '{"amount": 100}' || true)
    printf '  %-48s -> %s %s\n' "$what: $method $path" "$code" "$(head -c 80 "$work/body" | tr -d '\n')"
    [ "$code" = "$expect" ] || { echo "     ^ MISMATCH: expected $expect"; failed=1; }
}
echo
echo "== requests through the L7 proxy ($ENGINE; curl from each pod's own address)"
call 200 127.0.2.55 POST /v1/charge       "frontend-service"
call 403 127.0.2.55 GET  /v1/transactions "frontend-service"
call 403 127.0.2.55 POST /v1/refund       "frontend-service"
call 403 127.0.2.60 POST /v1/charge       "reporting-job (other labels)"
call 403 127.0.2.55 POST /v1//refund      "frontend-service, path trick"
call 400 127.0.2.55 POST /v1%2Frefund     "frontend-service, escaped slash"

echo
echo "== l7gate xds status"
"$L7GATE" xds status

# -- flows (issue 5): the article's `hubble observe`, from the access logs Envoy streamed ------
# Seven flows to billing-service-xyz: the allowed call's request and response, four denials,
# one escaped slash refused before policy. Envoy flushes its access logs every 50 ms.
for _ in $(seq 50); do
    [ "$("$L7GATE" observe --to-pod payments/billing-service-xyz --last 100 -o compact | wc -l)" -ge 7 ] && break
    sleep 0.1
done
echo
echo "== l7gate observe --to-pod payments/billing-service-xyz"
"$L7GATE" observe --to-pod payments/billing-service-xyz | tee "$work/flows"
for want in "http-request FORWARDED POST http://billing-service.payments/v1/charge" \
            "http-response FORWARDED 200" \
            "l7 DROPPED Policy denied (L7)"; do
    tr -s ' ' < "$work/flows" | grep -qF -- "$want" || { echo "     ^ MISSING flow: $want"; failed=1; }
done
exit "$failed"
