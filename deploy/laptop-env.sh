#!/usr/bin/env bash
# Write deploy/.env with fresh keys for the laptop stack (deploy/compose.yaml): compose
# reads it for the ${...} variables. The keys are random per laptop and never committed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/.env"
if [ -e "$out" ]; then
  echo "$out exists; delete it first to make new keys (the stored data would be unreadable)" >&2
  exit 1
fi
rand() { python3 -c "import base64, os; print(base64.b64encode(os.urandom($1)).decode())"; }
umask 077
cat >"$out" <<ENV
M365SYNC_MASTER_KEYS=laptop1:$(rand 32)
M365SYNC_HASH_KEY=$(rand 32)
M365SYNC_CONNECT_SECRET=$(rand 32)
M365SYNC_API_TOKEN=$(rand 24)
ENV
echo "wrote $out"
