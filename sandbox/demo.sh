#!/usr/bin/env bash
# `make demo`: start the sandbox, apply the CRDs, run the operator, apply examples/, show what a user
# would look at, and stop cleanly (also on Ctrl-C or failure).
#
# Steps are functions so each can be replaced on its own; start_operator/stop_operator are a
# placeholder until the operator lands. A sandbox that was already running is reused and left
# running; one this script started is stopped at the end (DEMO_KEEP=1 keeps it).
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
  step "Operator"
  echo "PLACEHOLDER: the demo does not run the wattsched operator yet; it only shows the cluster"
  echo "state. Workloads stay unplaced and no NodePowerProfiles are written until it does."
}

stop_operator() {
  if [[ -n "$operator_pid" ]]; then kill -TERM "$operator_pid" 2>/dev/null || true; fi
}

apply_examples() {
  step "Applying the example EnergyBudgets and LLMWorkloads in examples/"
  local files=() file namespace
  for file in "$repo"/examples/*.yaml; do
    grep -q '^apiVersion: wattsched.io/' "$file" && files+=("$file")
  done
  if ((${#files[@]} == 0)); then echo "(no examples yet)"; return; fi
  for namespace in $(sed -n 's/^ *namespace: *\([a-z0-9-]*\).*/\1/p' "${files[@]}" | sort -u); do
    kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  done
  for file in "${files[@]}"; do kubectl apply -f "$file"; done
}

show() {
  step "GPU nodes (kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count,wattsched.io/rack)"
  kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count,wattsched.io/rack
  local kind
  for kind in energybudgets llmworkloads nodepowerprofiles; do
    step "kubectl get $kind -A"
    kubectl get "$kind" -A 2>&1 || echo "($kind: not available yet)"
  done
}

cleanup() {
  local status=$?
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
apply_examples
show
step "Demo finished"
