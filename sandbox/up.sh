#!/usr/bin/env bash
# Starts the sandbox control plane in the background on loopback, or reuses the one already running.
#
# Real components from sandbox/build.sh: etcd, kube-apiserver (RBAC + Node authorization, service
# accounts), kube-controller-manager, kube-scheduler and KWOK, which plays the kubelets of the GPU
# nodes in sandbox/nodes.yaml (SANDBOX_NODES=N scales them, see sandbox/nodes.py). Everything lives
# in $SANDBOX_DIR (default <repo>/.sandbox):
#   kubeconfig       admin kubeconfig (system:masters)
#   endpoints.yaml   every URL started (sandbox/endpoints.py adds more)
#   logs/*.log       one log per component; pki/ certificates (kept between runs); run/ pids, ports
# Each fresh start wipes etcd, so the cluster begins empty apart from the nodes, which must be Ready
# within SANDBOX_READY_SECONDS (default 120; thousands of nodes on a busy machine need more).
# Exits non-zero, with the failing component's log tail, when something does not come up.
#
# Not for: building binaries (sandbox/build.sh), Prometheus or agents (their owners add endpoints).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
sandbox_dir="${SANDBOX_DIR:-$repo/.sandbox}"
mkdir -p "$sandbox_dir"
sandbox_dir="$(cd "$sandbox_dir" && pwd)"
nodes_file="${SANDBOX_NODES_FILE:-$repo/sandbox/nodes.yaml}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
bindir="$("$here/build.sh" --dir)"
pki="$sandbox_dir/pki" run="$sandbox_dir/run" logs="$sandbox_dir/logs"
start_seconds=$SECONDS

log() { echo "sandbox/up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for binary in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwok-stages.yaml; do
  [[ -e "$bindir/$binary" ]] || die "missing $bindir/$binary; build the binaries first: make binaries (sandbox/build.sh)"
done

# One up/down at a time per sandbox (pytest and make may race).
exec 9>"$sandbox_dir/.lock"
flock 9

components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

alive() { # alive <component>: its recorded pid runs our binary
  local pidfile="$run/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(<"$pidfile")"
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$bindir/$1" ]]
}

admin_curl() { curl -fsS --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"; }

# --- Reuse a running sandbox ----------------------------------------------------------------------
if [[ -f "$run/ports.env" ]]; then
  all_alive=1
  for component in "${components[@]}"; do alive "$component" || all_alive=0; done
  # shellcheck source=/dev/null
  source "$run/ports.env"
  if ((all_alive)) && admin_curl "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1; then
    log "already running (kube-apiserver https://127.0.0.1:$APISERVER_PORT)"
    [[ -z "${SANDBOX_NODES:-}" ]] || log "SANDBOX_NODES ignored: the running sandbox keeps its nodes (make sandbox-down first)"
    echo "$sandbox_dir/kubeconfig"
    exit 0
  fi
  log "found a stopped or partial sandbox; restarting it"
  flock -u 9
  "$here/down.sh" >/dev/null
  flock 9
fi

# --- PKI (kept between runs) ---------------------------------------------------------------------
mkdir -p "$pki" "$run" "$logs"
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# sign <name> <subject> <extensions>: key + certificate signed by the sandbox CA
sign() {
  ec_key "$pki/$1.key"
  openssl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile <(printf '%s\n' "$3") -out "$pki/$1.crt" 2>/dev/null
  rm -f "$pki/$1.csr"
}
if [[ ! -f "$pki/complete" ]]; then
  log "generating PKI in $pki"
  rm -f "$pki"/*
  ec_key "$pki/ca.key"
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=wattsched-sandbox-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$pki/ca.crt" 2>/dev/null
  client_ext=$'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth'
  sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign admin "/O=system:masters/CN=wattsched-admin" "$client_ext"
  sign kube-controller-manager "/CN=system:kube-controller-manager" "$client_ext"
  sign kube-scheduler "/CN=system:kube-scheduler" "$client_ext"
  sign kwok "/O=system:masters/CN=kwok" "$client_ext"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  touch "$pki/complete"
fi

# --- Ports: free loopback ports, chosen together ---------------------------------------------------
read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT CONTROLLER_MANAGER_PORT SCHEDULER_PORT KWOK_PORT < <(
  python3 -c 'import socket
sockets = [socket.socket() for _ in range(6)]
for s in sockets: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))')
cat >"$run/ports.env" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
CONTROLLER_MANAGER_PORT=$CONTROLLER_MANAGER_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
KWOK_PORT=$KWOK_PORT
EOF
apiserver_url="https://127.0.0.1:$APISERVER_PORT"

# kubeconfig <file> <identity>: a kubeconfig with embedded certificates
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: wattsched-sandbox
  cluster:
    server: $apiserver_url
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$2.crt")
    client-key-data: $(base64 -w0 <"$pki/$2.key")
contexts:
- name: wattsched-sandbox
  context: {cluster: wattsched-sandbox, user: $2}
current-context: wattsched-sandbox
EOF
}
for identity in kube-controller-manager kube-scheduler kwok; do kubeconfig "$pki/$identity.kubeconfig" "$identity"; done
kubeconfig "$sandbox_dir/kubeconfig.tmp" admin
mv "$sandbox_dir/kubeconfig.tmp" "$sandbox_dir/kubeconfig"

# --- Start every component at once; each retries until the API server answers ----------------------
rm -rf "$sandbox_dir/etcd-data"
# A start that fails stops whatever it launched (the logs stay for the post-mortem).
stop_on_failure() {
  local status=$?
  if ((status != 0)); then
    flock -u 9
    "$here/down.sh" >/dev/null 2>&1 || true
    log "stopped the partial sandbox; component logs: $logs"
  fi
  exit "$status"
}
trap stop_on_failure EXIT
for component in "${components[@]}"; do : >"$logs/$component.log"; done
launched=()
# launch <component> <args...>: own session, survives this script, no lock fd; pid in run/
launch() {
  local component="$1"; shift
  setsid "$bindir/$component" "$@" >>"$logs/$component.log" 2>&1 </dev/null 9>&- &
  echo $! >"$run/$component.pid"
  launched+=("$component")
}

# wait_for <what> <timeout s> <command...>: poll every 0.2 s; fail early when a component died
wait_for() {
  local what="$1" timeout="$2" deadline component; shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    for component in "${launched[@]}"; do
      if ! alive "$component"; then
        tail -n 30 "$logs/$component.log" >&2 || true
        die "$component exited while waiting for $what (log: $logs/$component.log)"
      fi
    done
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what (logs: $logs)"
    sleep 0.2
  done
}

# etcd, kube-apiserver and kwok (which waits for the API server) start together; the controller
# manager and scheduler need the API server's RBAC bootstrap first.
log "starting etcd, kube-apiserver, kwok, then kube-controller-manager, kube-scheduler (logs: $logs)"
launch etcd --name sandbox --data-dir "$sandbox_dir/etcd-data" --log-level warn --unsafe-no-fsync \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "sandbox=http://127.0.0.1:$ETCD_PEER_PORT"

launch kube-apiserver --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
  --service-account-issuer "$apiserver_url" --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" --api-audiences "$apiserver_url" \
  --service-cluster-ip-range 10.96.0.0/16 --endpoint-reconciler-type none \
  --profiling=false --event-ttl 2h --v 1

launch kwok --kubeconfig "$pki/kwok.kubeconfig" --config "$bindir/kwok-stages.yaml" \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds 40 --cidr 10.244.0.0/16 --node-ip 10.0.0.1 \
  --server-address "127.0.0.1:$KWOK_PORT"

wait_for "etcd" 30 curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
wait_for "kube-apiserver /readyz" 60 admin_curl "$apiserver_url/readyz"

launch kube-controller-manager --kubeconfig "$pki/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig "$pki/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig "$pki/kube-controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" --leader-elect=false \
  --use-service-account-credentials --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" --cluster-signing-cert-file "$pki/ca.crt" \
  --cluster-signing-key-file "$pki/ca.key" --controllers '*' --concurrent-gc-syncs 5 \
  --profiling=false --v 1

launch kube-scheduler --kubeconfig "$pki/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig "$pki/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig "$pki/kube-scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false \
  --profiling=false --v 1

# --- GPU nodes (created while the controller manager and scheduler start) --------------------------
kubectl_admin() { "$bindir/kubectl" --kubeconfig "$sandbox_dir/kubeconfig" "$@"; }
if [[ -n "${SANDBOX_NODES:-}" ]]; then
  log "creating $SANDBOX_NODES nodes with the product mix of $nodes_file"
  "$python" "$here/nodes.py" "$nodes_file" "$SANDBOX_NODES" | kubectl_admin create -f - >/dev/null
else
  log "creating the nodes of $nodes_file"
  kubectl_admin create -f "$nodes_file" >/dev/null
fi
wait_for "kube-controller-manager /healthz" 30 curl -fsSk --max-time 2 "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
wait_for "kube-scheduler /readyz" 30 curl -fsSk --max-time 2 "https://127.0.0.1:$SCHEDULER_PORT/readyz"
all_nodes_ready() {
  local statuses
  statuses="$(kubectl_admin get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')"
  [[ -n "$statuses" ]] && ! grep -qv '^True$' <<<"$statuses"
}
wait_for "every node Ready" "${SANDBOX_READY_SECONDS:-120}" all_nodes_ready
# kube-controller-manager's node lifecycle controller takes the not-ready taint off each node some
# time after it turns Ready (seconds for a few nodes, ~50 s for 200 on this machine): until then
# kube-scheduler binds nothing there, and each removal is a node update the operator re-plans on.
no_not_ready_taint() {
  local taints
  taints="$(kubectl_admin get nodes -o jsonpath='{range .items[*]}{.spec.taints[*].key}{"\n"}{end}')" &&
    ! grep -q 'node.kubernetes.io/not-ready' <<<"$taints"
}
wait_for "no node tainted not-ready" "${SANDBOX_READY_SECONDS:-120}" no_not_ready_taint
wait_for "the default service account" 30 kubectl_admin get serviceaccount default -n default

# --- Endpoints -----------------------------------------------------------------------------------
cat >"$sandbox_dir/endpoints.yaml" <<EOF
# Endpoints of this sandbox; edit with sandbox/endpoints.py add|remove NAME [URL].
kubeconfig: $sandbox_dir/kubeconfig
endpoints:
  apiserver: $apiserver_url
  etcd: http://127.0.0.1:$ETCD_PORT
  kube-controller-manager: https://127.0.0.1:$CONTROLLER_MANAGER_PORT
  kube-scheduler: https://127.0.0.1:$SCHEDULER_PORT
  kwok: http://127.0.0.1:$KWOK_PORT
EOF

trap - EXIT
node_count="$(kubectl_admin get nodes --no-headers | wc -l)"
log "ready in $((SECONDS - start_seconds)) s: $node_count nodes, kube-apiserver $apiserver_url"
log "export KUBECONFIG=$sandbox_dir/kubeconfig PATH=$bindir:\$PATH"
echo "$sandbox_dir/kubeconfig"
