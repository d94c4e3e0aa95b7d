#!/usr/bin/env bash
# The seed scenario end to end in loopback mode, without privileges: a real agent and a real
# Envoy enforce the article's policies; each pod is a process on its own 127.x address.
#   billing-service (cluster-a) x2 : servers on 127.0.1.10 / 127.0.1.11, port 18080
#   Envoy                          : listens for them on 127.0.1.10:8080 / 127.0.1.11:8080
#   frontend-service (cluster-b)   : curl from 127.0.2.55
#   reporting-job (other labels)   : curl from 127.0.2.60
# Exits non-zero if any request gets a status other than the article's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

L7GATE=$PWD/.venv/bin/l7gate
PY=$PWD/.venv/bin/python
work=$(mktemp -d /tmp/l7g-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/agent.yaml" <<CFG
node: node-a1
cluster: {name: cluster-a, id: 1}
clusters: {cluster-b: 2}
stateDir: $work/state
admin: {listen: "unix:$work/admin.sock"}
envoy: {logLevel: warning}
CFG
export L7GATE_ADMIN="unix:$work/admin.sock"

echo "== starting the agent (loopback mode): l7gate agent --config agent.yaml"
"$L7GATE" agent --config "$work/agent.yaml" 2> "$work/agent.log" &
pids+=($!)
for _ in $(seq 100); do
    "$L7GATE" status >/dev/null 2>&1 && break
    sleep 0.1
done
"$L7GATE" status >/dev/null || { cat "$work/agent.log"; exit 1; }

for ip in 127.0.1.10 127.0.1.11; do
    "$PY" scripts/pod_server.py --listen "$ip:18080" --name "payments/billing-service@$ip" > /dev/null &
    pids+=($!)
done

echo "== l7gate endpoint apply -f examples/loopback/inventory.yaml"
"$L7GATE" endpoint apply -f examples/loopback/inventory.yaml
echo "== l7gate policy apply -f examples/seed"
"$L7GATE" policy apply -f examples/seed 2>/dev/null
echo "== l7gate endpoint list"
"$L7GATE" endpoint list

# Wait until Envoy has acknowledged the configuration.
for _ in $(seq 100); do
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
echo "== requests through Envoy (curl from each pod's own address)"
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
