#!/usr/bin/env bash
# Builds (or reuses) the wattsched image from the repository's Dockerfile without a Docker engine.
#
# Debian's buildah builds the Dockerfile as it is (`buildah bud --isolation chroot`, no daemon, no
# registry). The Dockerfile's default base, python:3.12-slim-bookworm, cannot be pulled here, so a
# local base stands in for it (build-arg PYTHON_IMAGE): Debian $suite made with
# `debootstrap --variant=minbase` plus python3, python3-venv and ca-certificates, with this
# machine's CA bundle (/etc/ssl/certs/ca-certificates.crt) so that pip inside the build can verify
# the package registry. Because of that bundle the base and the image built on it are for this
# machine only: never push them.
#
# Caching, in buildah's own storage (root: /var/lib/containers/storage):
#   localhost/wattsched-base:<suite>-<key>  key = this recipe, the suite and the CA bundle
#   localhost/wattsched:<key>               key = the base's image ID and every file the build
#                                            context holds (Dockerfile, .dockerignore, pyproject.toml,
#                                            README.md, api/, operator/, optimizer/, agent/, simulator/, cli/)
# A warm run with unchanged inputs builds nothing (about a second). A new image replaces the older
# localhost/wattsched tags; `localhost/wattsched:dev` always names the newest.
#
# Usage: sandbox/image.sh [build]   build or reuse; prints the image reference on stdout
#        sandbox/image.sh clean     removes the containers (and their mounts) made from the images
#        sandbox/image.sh purge     clean, and removes the cached base and images (a cold start)
# Needs root (debootstrap and buildah's chroot isolation); installs buildah and debootstrap with
# apt-get when missing. Concurrent runs wait for each other (lock file in $WATTSCHED_CACHE/image).
# Environment: WATTSCHED_BASE_SUITE (default bookworm), WATTSCHED_DEBIAN_MIRROR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${WATTSCHED_CACHE:-$HOME/.cache/wattsched}"
suite="${WATTSCHED_BASE_SUITE:-bookworm}"
mirror="${WATTSCHED_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_bundle=/etc/ssl/certs/ca-certificates.crt
base_packages=python3,python3-venv,ca-certificates
# Bump when the base recipe below changes, so cached bases are rebuilt.
base_recipe=1
base_repo=localhost/wattsched-base
image_repo=localhost/wattsched
# What the Dockerfile's build context holds (.dockerignore keeps only these, minus caches).
context=(Dockerfile .dockerignore pyproject.toml README.md api operator optimizer agent simulator cli)

log() { echo "sandbox/image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
  [[ "$(id -u)" == 0 ]] || die "needs root (debootstrap, buildah --isolation chroot): run it as root or with sudo"
}

# Debian's buildah and debootstrap, installed with apt-get when missing.
ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get to install them"
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

sha() { sha256sum | cut -c1-12; }

base_ref() {
  [[ -r "$ca_bundle" ]] || die "no CA bundle at $ca_bundle (pip in the build needs it)"
  echo "$base_repo:$suite-$({ echo "$base_recipe $suite $base_packages"; cat "$ca_bundle"; } | sha)"
}

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
# Every tag of these repositories.
our_images() {
  local repository
  for repository in "$@"; do
    buildah images --format '{{.Name}}:{{.Tag}}' | grep "^$repository:" || true
  done
}
image_id() { buildah images --no-trunc --format '{{.ID}}' "$1"; }

# The local stand-in for python:3.12-slim-bookworm, built unless cached.
build_base() {
  local ref="$1" start=$SECONDS
  exists "$ref" && return 0
  work="$(mktemp -d "$cache/image/base.XXXXXX")"
  # Global for the trap. debootstrap mounts /proc and /sys inside the target; never leave them behind.
  trap 'unmount_under "$work"; rm -rf "$work"' EXIT
  log "debootstrap --variant=minbase $suite ($mirror) with $base_packages"
  debootstrap --variant=minbase --include="$base_packages" "$suite" "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  unmount_under "$work"
  cp "$ca_bundle" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  # What slim images leave out: package caches and lists, manuals, translations.
  rm -rf "$work"/rootfs/var/cache/apt/* "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/* "$work"/rootfs/dev/*
  tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
  rm -rf "$work/rootfs"
  cat >"$work/Containerfile" <<EOF
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
  buildah bud --isolation chroot --quiet --pull=never --tag "$ref" "$work" >/dev/null
  unmount_under "$work"
  rm -rf "$work"
  trap - EXIT
  log "base $ref built in $((SECONDS - start)) s"
}

unmount_under() {
  local target
  # Deepest first.
  while read -r target; do umount -l "$target" 2>/dev/null || true; done \
    < <(awk -v dir="$1" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r)
}

image_ref() {
  local base_id="$1" context_key
  context_key="$(cd "$repo" && find "${context[@]}" -type f ! -path '*/__pycache__/*' \
    ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha)"
  echo "$image_repo:$(echo "$base_id $context_key" | sha)"
}

build() {
  need_root
  ensure_tools
  mkdir -p "$cache/image"
  exec 9>"$cache/image/.build.lock"
  flock 9
  local base ref start=$SECONDS
  base="$(base_ref)"
  build_base "$base"
  ref="$(image_ref "$(image_id "$base")")"
  if exists "$ref"; then
    log "reusing $ref (inputs unchanged)"
  else
    log "buildah bud --isolation chroot --build-arg PYTHON_IMAGE=$base ."
    (cd "$repo" && buildah bud --isolation chroot --pull=never --build-arg "PYTHON_IMAGE=$base" \
      --tag "$ref" . >"$cache/image/build.log" 2>&1) ||
      { tail -n 30 "$cache/image/build.log" >&2; die "buildah bud failed (log: $cache/image/build.log)"; }
    log "built $ref in $((SECONDS - start)) s ($(buildah images --format '{{.Size}}' "$ref"))"
  fi
  buildah tag "$ref" "$image_repo:dev"
  # Older builds of the image only take space.
  local old
  for old in $(our_images "$image_repo"); do
    [[ "$old" == "$ref" || "$old" == "$image_repo:dev" ]] ||
      buildah rmi "$old" >/dev/null 2>&1 || log "kept $old (a container uses it)"
  done
  echo "$ref"
}

# Containers made from our images (the tests' and any an interrupted run left), and their mounts.
clean() {
  command -v buildah >/dev/null || return 0
  need_root
  local container name
  while read -r container name; do
    [[ "$name" == wattsched-* ]] || continue
    buildah umount "$container" >/dev/null 2>&1 || true
    buildah rm "$container" >/dev/null
    log "removed container $name"
  done < <(buildah containers --noheading --format '{{.ContainerID}} {{.ContainerName}}')
}

# clean, and the cached base and images too: the next build starts cold.
purge() {
  clean
  command -v buildah >/dev/null || return 0
  local ref
  for ref in $(our_images "$image_repo" "$base_repo"); do
    buildah rmi --force "$ref" >/dev/null || true
  done
  log "removed the wattsched images ($base_repo, $image_repo)"
}

case "${1:-build}" in
  build) build ;;
  clean) clean ;;
  purge) purge ;;
  *) die "unknown command ${1@Q}: expected build, clean or purge" ;;
esac
