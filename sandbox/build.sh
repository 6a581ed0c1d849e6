#!/usr/bin/env bash
# Builds (or reuses) the sandbox's binaries from the Go module proxy with the machine's Go toolchain.
#
# Each component is built from a wrapper module in sandbox/go/<component> and cached by version under
# $WATTSCHED_CACHE/bin/<component>-<version>/, so warm runs cost nothing. Go's module and build caches
# live under $WATTSCHED_CACHE too. Prints the directory that holds every binary (for PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${WATTSCHED_CACHE:-$HOME/.cache/wattsched}"
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS="-mod=mod" GOTOOLCHAIN=local
export CGO_ENABLED=0
bindir="$cache/bin/sandbox-k8s${KUBERNETES_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}-helm${HELM_VERSION}"
mkdir -p "$bindir"

log() { echo "sandbox/build: $*" >&2; }

# build <wrapper dir> <version ldflags> <package>...: one `go build` per binary, skipped when cached.
build() {
  local wrapper="$1" ldflags="$2"; shift 2
  local pkg name
  for pkg in "$@"; do
    name="$(basename "$pkg")"
    [[ "$name" == v3 ]] && name=etcd
    if [[ -x "$bindir/$name" ]]; then continue; fi
    log "building $name ($pkg)"
    local start=$SECONDS
    (cd "$here/go/$wrapper" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bindir/$name.tmp" "$pkg")
    mv "$bindir/$name.tmp" "$bindir/$name"
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
build helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm

echo "$bindir"
