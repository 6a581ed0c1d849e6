#!/usr/bin/env bash
# Stops the sandbox in $SANDBOX_DIR (default <repo>/.sandbox); does nothing when none runs.
#
# Stops only the processes sandbox/up.sh recorded in $SANDBOX_DIR/run/*.pid, and only while such a
# pid still runs one of our binaries (never by name): SIGTERM, then SIGKILL after 10 s.
# Keeps logs/ (CI prints them after a failure) and pki/ (reused by the next start); drops etcd data.
#
# Not for: removing the binaries cache (make clean does not either; delete ~/.cache/wattsched).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
sandbox_dir="${SANDBOX_DIR:-$repo/.sandbox}"
[[ -d "$sandbox_dir/run" ]] || { echo "sandbox/down: nothing running in $sandbox_dir" >&2; exit 0; }
sandbox_dir="$(cd "$sandbox_dir" && pwd)"
run="$sandbox_dir/run"
bindir="$("$here/build.sh" --dir)"

exec 9>"$sandbox_dir/.lock"
flock 9

ours() { # ours <component> <pid>: the pid runs our binary of that component
  [[ "$(readlink "/proc/$2/exe" 2>/dev/null)" == "$bindir/$1" ]]
}

stopped=0
# stop <component>...: SIGTERM each, wait up to 10 s for all of them, then SIGKILL what is left.
stop() {
  local component pid deadline waiting=()
  for component in "$@"; do
    [[ -f "$run/$component.pid" ]] || continue
    pid="$(<"$run/$component.pid")"
    if ours "$component" "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      waiting+=("$component:$pid")
      stopped=$((stopped + 1))
    fi
    rm -f "$run/$component.pid"
  done
  deadline=$((SECONDS + 10))
  for entry in "${waiting[@]}"; do
    component="${entry%%:*}" pid="${entry#*:}"
    while ours "$component" "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if ours "$component" "$pid"; then
      echo "sandbox/down: $component (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
# etcd last: the API server shuts down cleanly only while its storage answers.
stop kwok kube-scheduler kube-controller-manager kube-apiserver
stop etcd

rm -rf "$sandbox_dir/etcd-data" "$run/ports.env" "$sandbox_dir/endpoints.yaml"
echo "sandbox/down: stopped $stopped components in $sandbox_dir" >&2
