#!/bin/sh
# Warm start of a pod over CRI, nixenv against an ordinary image on containerd's own runc shim,
# same containerd, same closure, alternated in one run (issue 7; goal: ratio <= 1.10).
#
#   bench/start.sh [WORKDIR]        (default WORKDIR: /var/tmp/nixenv-bench, shared with pull.sh)
#
# Environment: RUNS (rounds, default 20), CONCURRENT=N (burst mode: N pods at once per round;
# see bench/start-burst.sh), NIXENV_BENCH_LOG_LEVEL (containerd's log level, and so
# the shims' debug flag; default info), BIG=0 (skip the 1,000-path variant),
# NIXENV_BENCH_STRACE=DIR (profiling only: `strace -f -tt -T` of each pod's shim into DIR,
# attached after RunPodSandbox; slows the traced runs), NIXENV_KEEP_CONTAINERD=1 (keep
# containerd's dir and log, which holds the shims' logs). The binaries are built
# as shipped (bench/shipped-bins: release, and the static size-optimised shim of
# packaging/build-shim) into $CARGO_TARGET_DIR (default: the workspace's target dir). Needs root, containerd 1.6, runc and Nix.
#
# What is measured (tests/src/bin/nixenv-bench-start/main.rs), per sample: RunPodSandbox (host
# network) first, timed separately; then **CreateContainer + StartContainer + HTTP GET / retried
# every millisecond until the echoserver's first answer** — the headline number; the pod is then
# stopped and removed outside the timing. The store is warm: an untimed first round pulls the
# closures and checks every variant's answer. Variants, alternated within every round:
#   A  handler nixenv (containerd-shim-nixenv-v2), image empty:latest, annotation
#      nix.dev/environment: acme/echoserver (4 store paths), command echoserver;
#   B  handler runc (containerd-shim-runc-v2), an ordinary one-layer image holding the same 4
#      store paths under /nix/store, command echoserver through PATH, the lock's env;
#   D  like A with bench/echoserver-1000: echoserver + busybox + the 1,001-path small closure of
#      bench/closure.nix (1,005 store paths, so 1,005 bind mounts), published by `nixenv publish`.
# Printed: median (p90, min) per phase, the ratio A/B (goal <= 1.10), the ratio D/A, and the
# load average before and after.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# Nix with nixenv's own configuration (tests/nix/nix.conf): never the host's /etc/nix, groups
# or users (a fresh Debian has no `nixbld` group, and Nix's sandbox would hide /usr/bin).
export NIX_CONF_DIR="$repo/tests/nix" NIX_USER_CONF_FILES="$repo/tests/nix/nix.conf"
unset NIX_CONFIG
work=${1:-/var/tmp/nixenv-bench}
BIG=${BIG:-1}
nixx() { nix --extra-experimental-features nix-command "$@"; }
log() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "bench/start.sh: run as root (containerd, runc)" >&2; exit 1; }
mkdir -p "$work"
work=$(cd "$work" && pwd)

log "building the binaries as shipped (release; the shim by packaging/build-shim)"
bin=$("$here/shipped-bins" nixenv nixenv-bench-start)

if [ "$BIG" != 0 ]; then
    # The 1,001-path small closure of bench/closure.nix (the same as bench/pull.sh's), signed
    # with the test key, in a zstd file cache of its own (idempotent: reused on the next run).
    mkdir -p "$work/bootstrap"
    cmp -s /bin/busybox "$work/bootstrap/busybox" || cp /bin/busybox "$work/bootstrap/busybox"
    small=$(nix-build "$here/closure.nix" --quiet --option substituters '' \
        --arg bootstrap "$work/bootstrap" --arg manifest /dev/null --arg n 0 \
        -A small-root -o "$work/start-small")
    cache="$work/start-cache-zstd"
    if [ ! -f "$cache/.complete" ]; then
        log "making the zstd cache of $small ($(nix-store -qR "$small" | wc -l) paths)"
        nixx store sign --key-file "$repo/tests/fixtures/keys/nixenv-test-1.sec" --recursive "$small"
        nixx copy --quiet --to "file://$cache?compression=zstd" "$small"
        touch "$cache/.complete"
    fi
    export NIXENV_BENCH_BIG_ROOT="$small" NIXENV_BENCH_BIG_CACHE="$cache"
fi

log "machine: $(nproc) cores, $(uptime | sed 's/.*load/load/')"
# The binaries just built, as they are (no staleness rebuild while others edit the tree).
NIXENV_TEST_BIN_DIR="$bin" "$bin/nixenv-bench-start"
