#!/bin/sh
# Memory of containerd-shim-nixenv-v2 per running pod against containerd's own
# containerd-shim-runc-v2, in the same containerd (issue 7; goal: RSS ratio <= 1/3).
#
#   bench/shim-memory.sh
#
# Environment: PODS (running pods per handler, default 4), SETTLE_SECS (wait before reading
# /proc, default 15: tokio's idle blocking threads exit after 10 s), PLAIN=1 (the nixenv pods
# carry no annotation: what preparing a closure adds), DETAIL=1 (RSS by mapping of one shim of
# each kind). The binaries are built as shipped (bench/shipped-bins: release, and the static
# size-optimised shim of packaging/build-shim) into $CARGO_TARGET_DIR (default: the workspace's
# target dir). Needs root, containerd 1.6, runc and Nix (the fixture closures).
#
# What is measured (tests/src/bin/nixenv-bench-memory.rs): PODS mission pods on the nixenv
# handler (annotation nix.dev/environment: acme/echoserver, image empty:latest, command
# echoserver, each answering HTTP; the store warmed by one pod first) and PODS busybox httpd
# pods on the runc handler, all running at once, one shim per pod. Per shim: VmRSS, Pss and
# private (USS) pages; printed: the medians per shim and the ratios nixenv/runc.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
[ "$(id -u)" = 0 ] || { echo "bench/shim-memory.sh: run as root (containerd, runc)" >&2; exit 1; }
export SETTLE_SECS=${SETTLE_SECS:-15}
echo "== building the binaries as shipped (release; the shim by packaging/build-shim)" >&2
bin=$("$here/shipped-bins" nixenv nixenv-bench-memory)
echo "== machine: $(nproc) cores, $(uptime | sed 's/.*load/load/')" >&2
NIXENV_TEST_BIN_DIR="$bin" "$bin/nixenv-bench-memory"
