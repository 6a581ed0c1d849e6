#!/usr/bin/env bash
# `make demo`: start the sandbox, apply the CRDs, run the operator, apply examples/, show what a user
# would look at, and stop cleanly (also on Ctrl-C or failure).
#
# Steps are functions so each can be replaced on its own. The operator (standalone) and one simulated
# agent process serving every KWOK GPU node run in the background, logging to $SANDBOX_DIR/logs.
# After the examples are placed, the rack-a budget is lowered to show the operator lower limits
# (and preempt, if it must), `wattsched plan --from-cluster --diff` shows what raising it again
# would change, and `wattsched status` shows the result on one screen. A sandbox that was already running is reused and left running; one this
# script started is stopped at the end (DEMO_KEEP=1 keeps it).
#
# Not for: tests (make test) or load experiments (SANDBOX_NODES=N make sandbox-up).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export SANDBOX_DIR="${SANDBOX_DIR:-$repo/.sandbox}"
PATH="$("$here/build.sh" --dir):$PATH"
export PATH

step() { printf '\n==> %s\n' "$*"; }

started_sandbox=0
operator_pid=""
agents_pid=""
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
wattsched=("$python" -m wattsched_cli.main)  # an array, so `&` gives the python process's pid

start_sandbox() {
  step "Starting the sandbox control plane (etcd, kube-apiserver, scheduler, controller-manager, KWOK)"
  local output
  output="$("$here/up.sh" 2>&1 >/dev/null)" || { echo "$output" >&2; return 1; }
  echo "$output"
  [[ "$output" == *"already running"* ]] || started_sandbox=1
  export KUBECONFIG="$SANDBOX_DIR/kubeconfig"
}

apply_crds() {
  step "Applying the CRDs in crds/"
  shopt -s nullglob
  local files=("$repo"/crds/*.yaml)
  if ((${#files[@]} == 0)); then echo "(no CRDs yet)"; return; fi
  local file_args=() file
  for file in "${files[@]}"; do file_args+=(-f "$file"); done
  kubectl apply --server-side --force-conflicts "${file_args[@]}"
  kubectl wait --for=condition=Established --timeout=60s "${file_args[@]}"
}

start_operator() {
  step "Starting the simulated node agents and the wattsched operator"
  mkdir -p "$SANDBOX_DIR/logs"
  # Each KWOK node's GPU allocation is served over the kubelet's PodResources proto on a unix
  # socket, and the agents read it back as on a real node (docs/telemetry.md).
  "${wattsched[@]}" agent --backend simulated --all-nodes --metrics-port 0 --interval-seconds 1 \
    --pod-resources-dir "$SANDBOX_DIR/pod-resources" \
    >"$SANDBOX_DIR/logs/demo-agents.log" 2>&1 &
  agents_pid=$!
  "${wattsched[@]}" operator --standalone --metrics-port 0 --health-port 0 --debounce-seconds 0.5 \
    >"$SANDBOX_DIR/logs/demo-operator.log" 2>&1 &
  operator_pid=$!
  echo "agents pid $agents_pid, operator pid $operator_pid (logs: $SANDBOX_DIR/logs/demo-*.log)"
}

stop_operator() {
  local pid
  for pid in "$operator_pid" "$agents_pid"; do
    if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in "$operator_pid" "$agents_pid"; do
    if [[ -n "$pid" ]]; then wait "$pid" 2>/dev/null || true; fi
  done
}

# wait_for_agents: the first plan counts a GPU whose agent has not reported yet at its maximum
# limit (the Unschedulable message says so), which would keep every workload out of the first round; wait (at most 60 s)
# until every GPU node's NodePowerProfile says its agent is ready, as on a cluster running a while.
wait_for_agents() {
  step "Waiting for the node agents to report ready on every GPU node"
  local deadline=$((SECONDS + 60)) nodes ready
  nodes="$(kubectl get nodes -l nvidia.com/gpu.present=true -o name | wc -l)"
  while ((SECONDS < deadline)); do
    ready="$(kubectl get nodepowerprofiles \
      -o jsonpath='{range .items[*]}{.status.agent.ready}{"\n"}{end}' 2>/dev/null | grep -c '^true$' || true)"
    if ((ready >= nodes)); then echo "$ready of $nodes GPU nodes ready"; return; fi
    sleep 1
  done
  echo "(only ${ready:-0} of $nodes GPU nodes ready after 60 s; see $SANDBOX_DIR/logs/demo-agents.log)"
}

provide_volumes() {
  # The training and fine-tuning examples mount claims; bind each to a hostPath volume.
  local claim
  for claim in $(sed -n 's/^ *claimName: *\([a-z0-9-]*\).*/\1/p' "$repo"/examples/*.yaml | sort -u); do
    kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-$claim}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  hostPath: {path: /tmp/demo-$claim}
  storageClassName: ""
  claimRef: {namespace: default, name: $claim}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim, namespace: default}
spec:
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 1Gi}}
  storageClassName: ""
  volumeName: demo-$claim
YAML
  done
}

apply_examples() {
  step "Applying the example EnergyBudgets and LLMWorkloads: kubectl apply -f examples/"
  # examples/ holds only manifests to apply (offline inputs live in offline/ and sandbox/).
  kubectl apply -f "$repo/examples/"
}

# settle: wait until no workload is waiting for its first plan or for its pods (at most 90 s).
settle() {
  local deadline=$((SECONDS + 90)) phases
  while ((SECONDS < deadline)); do
    phases="$(kubectl get llmworkloads -A -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}')"
    if ! grep -qvE '^(Running|Pending|Preempted|Succeeded|Failed)$' <<<"$phases"; then
      sleep 2  # one more round for the last status writes
      return
    fi
    sleep 1
  done
  echo "(some workloads are still settling)"
}

show_placements() {
  step "Workloads: node, variant, per-GPU power limit (planned; NodePowerProfiles show what was applied)"
  kubectl get llmworkloads -A -o custom-columns='NAMESPACE:.metadata.namespace,NAME:.metadata.name,TYPE:.spec.type,PHASE:.status.phase,NODES:.status.nodes,VARIANT:.status.variant,LIMIT(W/GPU):.status.placements[*].powerLimitWatts,POWER(W):.status.power.capWatts'
  step "Budgets: cap, allocated (sum of GPU power limits in scope, modelled) and headroom"
  kubectl get energybudgets -o wide
  step "NodePowerProfiles: target (operator) vs applied and draw (agent, simulated NVML)"
  kubectl get nodepowerprofiles
}

show() {
  step "GPU nodes (kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count,wattsched.io/rack)"
  kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count,wattsched.io/rack
  settle
  show_placements
  local first
  first="$(kubectl get llmworkloads -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)"
  if [[ -n "$first" ]]; then
    step "wattsched explain default/$first"
    "${wattsched[@]}" explain "default/$first"
  fi
}

change_budget() {
  local cap=${DEMO_RACK_A_CAP_WATTS:-7000}
  kubectl get energybudget rack-a >/dev/null 2>&1 || return 0
  step "Lowering EnergyBudget rack-a to $cap W (kubectl patch); the operator lowers limits first"
  kubectl patch energybudget rack-a --type merge -p "{\"spec\":{\"powerCapWatts\":$cap}}"
  sleep 3
  settle
  show_placements
  if kubectl get llmworkload llama-8b-pretrain >/dev/null 2>&1; then
    step "wattsched explain default/llama-8b-pretrain (what sets its power limit now)"
    "${wattsched[@]}" explain default/llama-8b-pretrain
  fi
  step "Recent wattsched events"
  kubectl get events -A --field-selector involvedObject.kind=LLMWorkload \
    --sort-by=.lastTimestamp | tail -n 15
}

cleanup() {
  local status=$?
  if ((!started_sandbox)) && [[ -n "$operator_pid" ]]; then
    # A reused sandbox stays up: let the operator release the examples (finalizers) before it stops.
    step "Deleting the examples from the reused sandbox"
    kubectl delete llmworkloads --all -n default --timeout=60s || true
    kubectl delete energybudgets cluster rack-a --ignore-not-found --timeout=60s || true
    # and their Events, so a later run's "Recent wattsched events" and status show only its own
    kubectl delete events -n default --field-selector involvedObject.kind=LLMWorkload >/dev/null || true
  fi
  stop_operator
  if ((started_sandbox)) && [[ "${DEMO_KEEP:-}" != 1 ]]; then
    step "Stopping the sandbox"
    "$here/down.sh"
  elif ((started_sandbox)); then
    echo "sandbox left running (DEMO_KEEP=1): export KUBECONFIG=$SANDBOX_DIR/kubeconfig"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_sandbox
apply_crds
start_operator
wait_for_agents
provide_volumes
apply_examples
show
change_budget
step "What if rack-a went back up? wattsched plan --from-cluster --set ... --diff (read-only)"
"${wattsched[@]}" plan --from-cluster --set energybudget/rack-a.spec.powerCapWatts=12000 --diff
step "wattsched status (one screen: budgets, unplaced workloads, moves, unconfirmed nodes, rounds)"
"${wattsched[@]}" status
step "Demo finished"
