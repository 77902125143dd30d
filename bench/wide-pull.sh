#!/bin/sh
# Memory and time of pulling a very wide closure: `nixenv pull` of a synthetic N-path closure
# (default 100,000 tiny paths; tests/src/wide.rs) against Nix substituting the same closure,
# same cache, same HTTP server on 127.0.0.1, in one run.
#
#   bench/wide-pull.sh [WORKDIR]        (default WORKDIR: /var/tmp/nixenv-bench-wide)
#
# Environment: N (paths, default 100000); NIX=0 skips the Nix run; NIXENV / SERVER / MAKE
# (binaries; default: release builds in the workspace target dir, built if missing).
#
# Prints, per tool, wall time and peak RSS (/usr/bin/time -v), and the ratios nix/nixenv.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
export NIX_CONF_DIR="$repo/tests/nix" NIX_USER_CONF_FILES="$repo/tests/nix/nix.conf"
unset NIX_CONFIG
work=${1:-/var/tmp/nixenv-bench-wide}
N=${N:-100000}
NIX=${NIX:-1}
log() { echo "== $*" >&2; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
NIXENV=${NIXENV:-$target/release/nixenv}
SERVER=${SERVER:-$target/release/nixenv-test-server}
MAKE=${MAKE:-$target/release/nixenv-make-wide-cache}
if [ ! -x "$NIXENV" ] || [ ! -x "$SERVER" ] || [ ! -x "$MAKE" ]; then
    log "building release binaries"
    (cd "$repo" && cargo build --release -p nixenv-cli -p nixenv-testkit --bin nixenv \
        --bin nixenv-test-server --bin nixenv-make-wide-cache)
fi
[ -x /usr/bin/time ] || apt-get install -y time >/dev/null

key_pub=$(cat "$repo/tests/fixtures/keys/nixenv-test-1.pub")
cache="$work/cache-$N"
if [ ! -s "$cache/root" ]; then
    log "writing a $N-path cache"
    rm -rf "$cache"
    t0=$(date +%s)
    "$MAKE" "$cache" "$N" "$repo/tests/fixtures/keys/nixenv-test-1.sec" >"$cache.root"
    mv "$cache.root" "$cache/root"
    log "cache written in $(($(date +%s) - t0)) s"
fi
root=$(cat "$cache/root")

pid=""
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    rm -rf "$work/run"
}
trap cleanup EXIT INT TERM
rm -rf "$work/run" && mkdir -p "$work/run"
"$SERVER" "$cache" >"$work/run/url" &
pid=$!
i=0
while [ ! -s "$work/run/url" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
url=$(cat "$work/run/url")

measure() { # NAME COMMAND... -> "seconds rss_kib" on stdout
    name=$1
    shift
    sync
    /usr/bin/time -f '%e %M' -o "$work/run/time-$name" "$@" >/dev/null 2>"$work/run/$name.err" ||
        { tail -5 "$work/run/$name.err" >&2; exit 1; }
    cat "$work/run/time-$name"
}

printf 'state-dir = "%s"\nsubstituters = ["%s"]\ntrusted-public-keys = ["%s"]\n' \
    "$work/run/state" "$url" "$key_pub" >"$work/run/config.toml"
echo "machine: $(nproc) cores, $(uname -r); nix $(nix --version | awk '{print $3}')"
echo "closure: $N paths (root $root)"
set -- $(NIXENV_CONFIG="$work/run/config.toml" measure nixenv "$NIXENV" pull "$root")
nixenv_s=$1 nixenv_kib=$2
paths=$(find "$work/run/state/store" -mindepth 1 -maxdepth 1 ! -name '.*' | wc -l)
[ "$paths" -eq "$N" ] || { echo "nixenv installed $paths paths, expected $N" >&2; exit 1; }
printf '%-8s %10s %14s\n' tool "wall (s)" "peak RSS (MiB)"
printf '%-8s %10s %14.1f\n' nixenv "$nixenv_s" "$(echo "$nixenv_kib / 1024" | bc -l)"
if [ "$NIX" = 1 ]; then
    set -- $(XDG_CACHE_HOME="$work/run/xdg-cache" measure nix nix-store --store "$work/run/nixstore" \
        --realise "$root" --option substituters "$url" --option trusted-public-keys "$key_pub" \
        --option narinfo-cache-negative-ttl 0 --option narinfo-cache-positive-ttl 0)
    nix_s=$1 nix_kib=$2
    printf '%-8s %10s %14.1f\n' nix "$nix_s" "$(echo "$nix_kib / 1024" | bc -l)"
    printf 'nix/nixenv: wall %.2f, peak RSS %.2f\n' "$(echo "$nix_s / $nixenv_s" | bc -l)" \
        "$(echo "$nix_kib / $nixenv_kib" | bc -l)"
fi
