#!/usr/bin/env bash
# Memory of the node registry (`nixenv registry`, release build) serving the empty image: its
# VmRSS (and the anonymous part, RssAnon) after 1 and after 200 pulls' worth of requests
# (manifest by tag, config blob, manifest by digest), and whether it exits when idle.
#
#   bench/registry-memory.sh        (builds `nixenv` with --release if needed; needs curl)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --quiet -p nixenv-cli
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
packaging/empty-image "$work/empty.tar"
port=$((20000 + RANDOM % 20000))
"$target/release/nixenv" registry --archive "$work/empty.tar" --listen "127.0.0.1:$port" \
  --idle-exit 3s 2>"$work/log" &
pid=$!
base=http://127.0.0.1:$port/v2/library/empty
for _ in $(seq 50); do curl -fs "$base/manifests/latest" >/dev/null 2>&1 && break; sleep 0.1; done
rss() { awk '/^(VmRSS|RssAnon):/ { printf "%s %s kB  ", $1, $2 }' "/proc/$pid/status"; echo; }
pull() {
  manifest=$(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$base/manifests/latest")
  config=$(printf '%s' "$manifest" | sed -n 's/.*"config":{[^}]*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
  curl -fs "$base/blobs/$config" >/dev/null
  digest=$(curl -fsI "$base/manifests/latest" | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p')
  curl -fs "$base/manifests/$digest" >/dev/null
}
pull
echo "after 1 pull:    $(rss)"
for _ in $(seq 199); do pull; done
echo "after 200 pulls: $(rss)"
sleep 4
if kill -0 "$pid" 2>/dev/null; then echo "still running 4 s after the last request"; else echo "exited when idle (--idle-exit 3s): 0 kB"; fi
