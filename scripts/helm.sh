#!/usr/bin/env bash
# Print the path of a Helm v4 binary, building it from the Go module proxy the first time.
# The binary is cached outside the work tree keyed by its version (like FerretDB in
# scripts/services.sh), so a fresh clone on a machine that built it once pays nothing.
#
#   scripts/helm.sh          build if missing, print the binary's path
#   scripts/helm.sh --cached print the path if the binary is cached, else exit 1 silently
set -euo pipefail

version="${M365SYNC_HELM_VERSION:-v4.3.2}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/m365sync"
bin="$cache/helm-$version/helm"

log() { printf '[helm] %s\n' "$*" >&2; }

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
if [ "${1:-}" = "--cached" ]; then
  exit 1
fi
if ! command -v go >/dev/null 2>&1; then
  log "no Go toolchain on PATH; cannot build Helm $version"
  exit 1
fi
log "building Helm $version from the Go module proxy (about 3 minutes on a fresh machine)"
started=$SECONDS
tmp="$cache/helm-$version.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
# GOBIN into a temporary directory, then one rename: an interrupted build never leaves a
# half-written binary where the next run would trust it.
GOTOOLCHAIN=local GOBIN="$tmp" go install -trimpath "helm.sh/helm/v4/cmd/helm@$version"
mkdir -p "$(dirname "$bin")"
mv "$tmp/helm" "$bin"
log "built in $((SECONDS - started)) s"
echo "$bin"
