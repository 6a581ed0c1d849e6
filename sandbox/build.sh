#!/usr/bin/env bash
# Builds (or reuses) the sandbox's binaries from the Go module proxy with the machine's Go toolchain.
#
# Each component is built from a wrapper module in sandbox/go/<component> and cached by version under
# $WATTSCHED_CACHE/bin/sandbox-<versions>/, so warm runs cost nothing. Go's module and build caches
# live under $WATTSCHED_CACHE too. Also writes kwok-stages.yaml there: KWOK's own stage configs
# (node initialize + heartbeat with lease, pod ready/complete/delete) taken from the kwok module.
# Prints the directory that holds every binary (for PATH). `build.sh --dir` only prints it.
# Concurrent runs wait for each other (lock file in the cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${WATTSCHED_CACHE:-$HOME/.cache/wattsched}"
mkdir -p "$cache/bin"
cache="$(cd "$cache" && pwd -P)"
bindir="$cache/bin/sandbox-k8s${KUBERNETES_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}-helm${HELM_VERSION}"
if [[ "${1:-}" == "--dir" ]]; then echo "$bindir"; exit 0; fi

export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS="-mod=mod" GOTOOLCHAIN=local
export CGO_ENABLED=0
log() { echo "sandbox/build: $*" >&2; }
# versions.env names the versions; each wrapper's go.mod must require exactly that one.
for pin in "kubernetes k8s.io/kubernetes $KUBERNETES_VERSION" "etcd go.etcd.io/etcd/server/v3 $ETCD_VERSION" \
  "kwok sigs.k8s.io/kwok $KWOK_VERSION" "helm helm.sh/helm/v3 $HELM_VERSION"; do
  read -r wrapper module version <<<"$pin"
  if ! grep -qE "^(require )?[[:space:]]*$module $version( |\$)" "$here/go/$wrapper/go.mod"; then
    log "ERROR: versions.env pins $module $version but sandbox/go/$wrapper/go.mod requires another"
    log "       version; update it: (cd sandbox/go/$wrapper && go get $module@$version && go mod tidy)"
    exit 1
  fi
done
need_go() { command -v go >/dev/null || { log "ERROR: no go toolchain on PATH (need Go >= 1.26)"; exit 1; }; }
mkdir -p "$bindir"
exec 9>"$cache/bin/.build.lock"
flock 9

# build <wrapper dir> <version ldflags> <package>...: one `go build` per binary, skipped when cached.
# A cached binary is reused only if it was built with the same link flags: they are recorded beside
# it in .<name>.ldflags. Binaries cached before these records existed were built with today's flags,
# except helm (its Kubernetes version flags came later), so they get their record and helm is rebuilt.
build() {
  local wrapper="$1" ldflags="$2"; shift 2
  local pkg name stamp
  for pkg in "$@"; do
    name="$(basename "$pkg")"
    [[ "$name" == v3 ]] && name=etcd
    stamp="$bindir/.$name.ldflags"
    if [[ -x "$bindir/$name" && ! -e "$stamp" && "$name" != helm ]]; then
      printf '%s\n' "$ldflags" >"$stamp"
    fi
    if [[ -x "$bindir/$name" && "$(cat "$stamp" 2>/dev/null)" == "$ldflags" ]]; then continue; fi
    need_go
    log "building $name ($pkg)"
    local start=$SECONDS
    (cd "$here/go/$wrapper" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bindir/$name.tmp" "$pkg")
    mv "$bindir/$name.tmp" "$bindir/$name"
    printf '%s\n' "$ldflags" >"$stamp"
    log "built $name in $((SECONDS - start)) s"
  done
}

k8s_minor="${KUBERNETES_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build etcd "" go.etcd.io/etcd/server/v3
build kubernetes "$k8s_ldflags" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
build kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
# helm's own Makefile sets its default Kubernetes version (what `helm template` and `helm lint` assume
# without --kube-version; v1.20 otherwise) from the client-go it is built with: v0.N -> v1.N.
helm_client_go_minor="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9][0-9]*\)\..*#\1#p' "$here/go/helm/go.mod")"
[[ -n "$helm_client_go_minor" ]] || { log "ERROR: no k8s.io/client-go in sandbox/go/helm/go.mod"; exit 1; }
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_client_go_minor"
done
build helm "$helm_ldflags" helm.sh/helm/v3/cmd/helm

# KWOK's standalone binary needs its stages passed with --config; use the ones of the pinned module.
if [[ ! -f "$bindir/kwok-stages.yaml" ]]; then
  need_go
  kwok_module="$(cd "$here/go/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  stages="$kwok_module/kustomize/stage"
  {
    echo "# KWOK stages from sigs.k8s.io/kwok@$KWOK_VERSION kustomize/stage/ (written by sandbox/build.sh)"
    for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
      pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
      echo "---"
      cat "$stages/$stage.yaml"
    done
  } >"$bindir/kwok-stages.yaml.tmp"
  mv "$bindir/kwok-stages.yaml.tmp" "$bindir/kwok-stages.yaml"
  log "wrote kwok-stages.yaml"
fi

echo "$bindir"
