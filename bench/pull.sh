#!/bin/sh
# Benchmark of `nixenv pull` against Nix 2.8 substituting the same closure, same machine,
# same cache, same HTTP server on 127.0.0.1, in one run.
#
#   bench/pull.sh [WORKDIR]        (default WORKDIR: /var/tmp/nixenv-bench)
#
# Environment: RUNS (cold runs per tool and compression, default 3), COMPRESSIONS (default
# "xz zstd"), TMPFS=1 (both tools' stores on a tmpfs: no disk in the measurement), N (big
# closure paths, default 240), TOTAL_MB (real binary content, default 320), CACHE_SERVER
# (`nginx`: nginx serving the cache directories with sendfile, as a self-hosted binary cache
# is served, the default when nginx is installed; `test`: nixenv-test-server, the default
# otherwise), NIXENV / SERVER / BENCH_DECODE (binaries; default: release builds in the
# workspace target dir, built if missing).
#
# 1. Builds with Nix a big closure (N paths, TOTAL_MB of host ELF files, a dependency chain of
#    depth 50 plus a DAG) and a 1,000-path small closure (bench/closure.nix); signs them with
#    the test key and makes xz and zstd caches (idempotent: reused on the next run).
# 2. Serves each cache on 127.0.0.1 with nginx (one worker, sendfile, keep-alive) or
#    nixenv-test-server (hyper, HTTP/1.1 + h2c); both tools pull from the same server.
# 3. Cold: alternating, RUNS times: `nixenv pull ROOT` into an empty state dir, and
#    `nix-store --store DIR --realise ROOT` (Nix's substitution into a fresh chroot store)
#    with the same substituter and key. Prints medians and the ratio Nix/nixenv.
#    After each nixenv run, the limits of the machine for the same NARs
#    (nixenv-bench-decode, one thread, the decoder nixenv uses): the CPU time of decoding
#    every NAR of the big closure divided by the cores (the decode limit), the same for
#    loopback transfer + decode + SHA-256 + unpack (the work limit), and the longest single
#    NAR's decode; prints the medians of the runs' nixenv/limit for both, and of nixenv's
#    own CPU time against the work's (what the machine's load does not change).
# 4. Peak RSS of one cold `nixenv pull` (/usr/bin/time -v).
# 5. Warm: `nixenv pull` of the 1,000-path closure already present (hyperfine, or a loop).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# Nix with nixenv's own configuration (tests/nix/nix.conf): never the host's /etc/nix, groups
# or users (a fresh Debian has no `nixbld` group, and Nix's sandbox would hide /usr/bin).
export NIX_CONF_DIR="$repo/tests/nix" NIX_USER_CONF_FILES="$repo/tests/nix/nix.conf"
unset NIX_CONFIG
work=${1:-/var/tmp/nixenv-bench}
RUNS=${RUNS:-3}
COMPRESSIONS=${COMPRESSIONS:-xz zstd}
N=${N:-240}
TOTAL_MB=${TOTAL_MB:-320}
nixx() { nix --extra-experimental-features nix-command "$@"; }
log() { echo "== $*" >&2; }

mkdir -p "$work"
work=$(cd "$work" && pwd)

# --- binaries -----------------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-$repo/target}
NIXENV=${NIXENV:-$target/release/nixenv}
SERVER=${SERVER:-$target/release/nixenv-test-server}
BENCH_DECODE=${BENCH_DECODE:-$target/release/nixenv-bench-decode}
if [ ! -x "$NIXENV" ] || [ ! -x "$SERVER" ] || [ ! -x "$BENCH_DECODE" ]; then
    log "building release binaries"
    (cd "$repo" && cargo build --release -p nixenv-cli -p nixenv-testkit --bin nixenv \
        --bin nixenv-test-server --bin nixenv-bench-decode)
fi
if [ ! -x /usr/bin/time ]; then
    apt-get install -y time >/dev/null
fi

# --- closures -----------------------------------------------------------------------------
mkdir -p "$work/bootstrap"
cmp -s /bin/busybox "$work/bootstrap/busybox" || cp /bin/busybox "$work/bootstrap/busybox"

manifest="$work/manifest-$N-$TOTAL_MB.txt"
if [ ! -f "$manifest" ]; then
    log "choosing $TOTAL_MB MB of host ELF files for $N paths"
    # Files of 16 KiB … 8 MiB under /usr/lib and /usr/bin that are ELF, each used once.
    find /usr/lib /usr/libexec /usr/bin /usr/sbin /usr/local -type f \
        -size +16k -size -8M -printf '%s %p\n' 2>/dev/null | sort -k2 |
        perl -ne 'chomp; my ($s, $f) = split / /, $_, 2;
                  open(my $h, "<", $f) or next; read($h, my $m, 4);
                  print "$s $f\n" if $m eq "\x7fELF"' >"$work/elf-files.txt"
    awk -v n="$N" -v total="$((TOTAL_MB * 1024 * 1024))" '
        BEGIN { per = total / n; i = 0; acc = 0; line = "" }
        i < n {
            line = line " " $2; acc += $1
            if (acc >= per) { print substr(line, 2); i++; acc = 0; line = "" }
        }
        END {
            if (i < n) { print "not enough ELF content on this host" > "/dev/stderr"; exit 1 }
        }' "$work/elf-files.txt" >"$manifest.tmp"
    mv "$manifest.tmp" "$manifest"
fi

log "building the closures with Nix (first run: a few minutes)"
t0=$(date +%s)
set -- $(nix-build "$here/closure.nix" --quiet --max-jobs 2 --option substituters '' \
    --arg bootstrap "$work/bootstrap" --arg manifest "$manifest" --arg n "$N" \
    -A big-root -A small-root -o "$work/result")
big=$1 small=$2
log "built in $(($(date +%s) - t0)) s: $big, $small"
key_file="$repo/tests/fixtures/keys/nixenv-test-1.sec"
key_pub=$(cat "$repo/tests/fixtures/keys/nixenv-test-1.pub")
nixx store sign --key-file "$key_file" --recursive "$big" "$small"
nix-store -qR "$big" >"$work/big-closure.txt"   # the NARs the limits are measured on
big_paths=$(wc -l <"$work/big-closure.txt")
big_bytes=$(nixx path-info -S "$big" | awk '{print $2}')
small_paths=$(nix-store -qR "$small" | wc -l)

for c in $COMPRESSIONS; do
    dir="$work/cache-$c"
    if [ ! -f "$dir/.complete-$N-$TOTAL_MB" ]; then
        # Resumable: nix copy skips paths whose narinfo is already in the cache.
        log "making the $c cache"
        t0=$(date +%s)
        nixx copy --quiet --to "file://$dir?compression=$c&parallel-compression=true" "$big" "$small"
        touch "$dir/.complete-$N-$TOTAL_MB"
        log "$c cache in $(($(date +%s) - t0)) s"
    fi
done

# --- servers ------------------------------------------------------------------------------
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    if [ "${tmpfs_mounted:-0}" = 1 ]; then umount "$work/run" || true; fi
    rm -rf "$work/run"
}
trap cleanup EXIT INT TERM
if [ -z "${CACHE_SERVER:-}" ]; then
    if command -v nginx >/dev/null; then CACHE_SERVER=nginx; else CACHE_SERVER=test; fi
fi
# A free TCP port on 127.0.0.1 (the kernel's choice; nginx cannot be given port 0).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
serve() { # DIR NAME: serve DIR in the background; set url_NAME, and pid_NAME to the process
    # that serves (whose CPU time is the server's)
    rm -f "$work/url-$2"
    case $CACHE_SERVER in
    nginx)
        conf="$work/nginx-$2"
        rm -rf "$conf"
        mkdir -p "$conf"
        port=$(free_port)
        cat >"$conf/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $conf/nginx.pid;
error_log $conf/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    types { }
    default_type application/octet-stream;
    client_body_temp_path $conf/body;
    proxy_temp_path $conf/proxy;
    server {
        listen 127.0.0.1:$port;
        root $1;
    }
}
EOF
        nginx -p "$conf" -c "$conf/nginx.conf" &
        pids="$pids $!"
        master=$! worker="" i=0
        while [ -z "$worker" ] && [ $i -lt 200 ]; do
            sleep 0.05
            worker=$(pgrep -P "$master" | head -1 || true)
            i=$((i + 1))
        done
        [ -n "$worker" ] || { echo "nginx did not start: $(cat "$conf/error.log")" >&2; exit 1; }
        # The master opens the listening socket before it starts the worker.
        eval "pid_$2=\$worker url_$2=http://127.0.0.1:$port"
        ;;
    test)
        "$SERVER" "$1" >"$work/url-$2" &
        pids="$pids $!"
        eval "pid_$2=\$!"
        i=0
        while [ ! -s "$work/url-$2" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
        eval "url_$2=\$(cat \"\$work/url-$2\")"
        ;;
    *)
        echo "CACHE_SERVER must be nginx or test, not $CACHE_SERVER" >&2
        exit 2
        ;;
    esac
}
for c in $COMPRESSIONS; do serve "$work/cache-$c" "$c"; done

mkdir -p "$work/run"
if [ "${TMPFS:-0}" = 1 ]; then
    mount -t tmpfs -o size=4g nixenv-bench "$work/run"
    tmpfs_mounted=1
fi
config() { # config STATE_DIR URL
    printf 'state-dir = "%s"\nsubstituters = ["%s"]\ntrusted-public-keys = ["%s"]\n' \
        "$1" "$2" "$key_pub" >"$work/run/config.toml"
    echo "$work/run/config.toml"
}
now() { date +%s.%N; }
fresh() { rm -rf "$work/run/state" "$work/run/nixstore"; sync; }

# CPU time (user + system, seconds) of process PID so far.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }
run_nixenv() { # URL ROOT SERVER_PID -> seconds; appends its CPU time (user + system) to
    # run/cpu-nixenv and the cache server's CPU time during the pull to run/cpu-server
    fresh
    cfg=$(config "$work/run/state" "$1")
    s0=$(proc_cpu "$3")
    t0=$(now)
    NIXENV_CONFIG=$cfg /usr/bin/time -o "$work/run/cpu.txt" -f '%U + %S' "$NIXENV" pull "$2" \
        >/dev/null 2>"$work/run/nixenv.err" || { cat "$work/run/nixenv.err" >&2; exit 1; }
    echo "$(now) - $t0" | bc
    tail -1 "$work/run/cpu.txt" | bc >>"$work/run/cpu-nixenv"
    echo "$(proc_cpu "$3") - $s0" | bc >>"$work/run/cpu-server"
}
run_nix() { # URL ROOT -> seconds
    fresh
    t0=$(now)
    # A private XDG cache dir: Nix must not answer narinfo lookups from an earlier run.
    rm -rf "$work/run/xdg-cache"
    XDG_CACHE_HOME="$work/run/xdg-cache" nix-store --store "$work/run/nixstore" --realise "$2" \
        --option substituters "$1" --option trusted-public-keys "$key_pub" \
        --option narinfo-cache-negative-ttl 0 --option narinfo-cache-positive-ttl 0 \
        >/dev/null 2>"$work/run/nix.err" || { cat "$work/run/nix.err" >&2; exit 1; }
    echo "$(now) - $t0" | bc
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

cores=$(nproc)
echo
echo "big closure: $big_paths paths, $((big_bytes / 1024 / 1024)) MiB unpacked (NarSize); small closure: $small_paths paths"
echo "machine: $cores cores, $(uname -r); nix $(nix --version | awk '{print $3}'); nixenv $("$NIXENV" --version 2>/dev/null | awk '{print $2}')"
echo "cache server: $CACHE_SERVER (the same for both tools)"
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-6s %-12s %-12s %-8s\n' cache "nixenv (s)" "nix (s)" "nix/nixenv"
# The limits: the work of the pull on one thread, part by part, spread over the cores, and
# the one NAR that cannot be split, measured by nixenv-bench-decode on the same NARs right
# after each nixenv run (this VM's speed drifts by a quarter within minutes, so each run is
# set against a limit measured seconds after it; the ratios below are medians of the runs'
# ratios). The decode limit is decoding alone (what bounds an xz pull); the work limit adds
# sending and receiving the compressed bytes over loopback, SHA-256 of the NAR and unpacking
# it into the same file system as the pull's store (what bounds a zstd pull). HTTP, the
# store's bookkeeping and its durability are nixenv's own cost, not the limit's. With TMPFS=1
# the store and the unpacking are on tmpfs, where all of the unpacking's CPU time is on the
# thread that writes; on a disk the writeback is not counted. nixenv's own CPU time against
# the work's says how far it is from the limit on a machine it has to itself; its wall time
# also pays for whatever else the machine runs, the cache server first: "+server" is the
# server's CPU time during the pull, and "busy" the share of both cores the two kept busy
# over nixenv's wall time. The floor, (the work + the server's CPU time) / cores, is what no
# client of this server could beat on these cores (the work's loopback part already counts
# one plain sender, so it is a little high). "1-pass" is decode + hash + unpack done in one
# pass per NAR, interleaved as a pull does them (not part of the limit: it shows whether the
# interleaving costs anything against the parts measured apart).
mkdir -p "$work/run/limit"
limit() { # C I: measure the limit for cache C after run I; append its parts to run/lim-*
    "$BENCH_DECODE" "$work/cache-$1" "$work/run/limit" <"$work/big-closure.txt" >"$work/run/limit-$1-$2"
    for k in loopback_cpu_s decode_cpu_s hash_cpu_s unpack_cpu_s work_cpu_s longest_decode_s \
        one_pass_cpu_s; do
        sed -n "s/^$k=//p" "$work/run/limit-$1-$2" >>"$work/run/lim-$k"
    done
}
ratio() { echo "($1) / ($2)" | bc -l; }
med() { median <"$work/run/$1"; }
for c in $COMPRESSIONS; do
    eval "url=\$url_$c"
    rm -f "$work/run/t-nixenv" "$work/run/t-nix" "$work/run/cpu-nixenv" "$work/run/cpu-server" \
        "$work/run"/lim-* "$work/run"/r-*
    eval "server_pid=\$pid_$c"
    i=0
    while [ $i -lt "$RUNS" ]; do
        run_nix "$url" "$big" >>"$work/run/t-nix"
        run_nixenv "$url" "$big" "$server_pid" >>"$work/run/t-nixenv"
        limit "$c" "$i"
        t=$(tail -1 "$work/run/t-nixenv") cpu=$(tail -1 "$work/run/cpu-nixenv")
        scpu=$(tail -1 "$work/run/cpu-server")
        dcpu=$(tail -1 "$work/run/lim-decode_cpu_s") wcpu=$(tail -1 "$work/run/lim-work_cpu_s")
        ratio "$t" "$(ratio "$dcpu" "$cores")" >>"$work/run/r-dl"
        ratio "$t" "$(ratio "$wcpu" "$cores")" >>"$work/run/r-wl"
        ratio "$cpu" "$wcpu" >>"$work/run/r-cpuwork"
        ratio "$(ratio "$cpu + $scpu" "$cores")" "$t" >>"$work/run/r-busy"
        ratio "$t" "$(ratio "$wcpu + $scpu" "$cores")" >>"$work/run/r-floor"
        i=$((i + 1))
    done
    a=$(median <"$work/run/t-nixenv")
    b=$(median <"$work/run/t-nix")
    printf '%-6s %-8.2f %-8.2f %-8.2f %-8.2f %-8.2f %-9.2f %-8.2f %-9.2f %-8.2f %-8.2f %-11.2f %-9.2f %-8.2f %-6.2f %-10.2f\n' \
        "$c" "$(med lim-loopback_cpu_s)" "$(med lim-decode_cpu_s)" "$(med lim-hash_cpu_s)" \
        "$(med lim-unpack_cpu_s)" "$(ratio "$(med lim-decode_cpu_s)" "$cores")" "$(med r-dl)" \
        "$(ratio "$(med lim-work_cpu_s)" "$cores")" "$(med r-wl)" "$(med lim-longest_decode_s)" \
        "$(med lim-one_pass_cpu_s)" \
        "$(med cpu-nixenv)" "$(med r-cpuwork)" "$(med cpu-server)" "$(med r-busy)" "$(med r-floor)" \
        >"$work/run/row-$c"
    printf '%-6s %-12.2f %-12.2f %-8.2f   (runs: nixenv %s; nix %s)\n' "$c" "$a" "$b" \
        "$(ratio "$b" "$a")" "$(tr '\n' ' ' <"$work/run/t-nixenv")" "$(tr '\n' ' ' <"$work/run/t-nix")"
    printf '       (wall / work limit, run by run: %s)\n' \
        "$(awk '{ printf "%.2f ", $1 }' "$work/run/r-wl")"
done

echo
echo "limits ($cores cores): CPU time (s) of one thread doing the pull's work on the same NARs, part by part (medians over the runs)"
printf '%-6s %-8s %-8s %-8s %-8s %-8s %-9s %-8s %-9s %-8s %-8s %-11s %-9s %-8s %-6s %-10s\n' cache \
    loopback decode hash unpack d-limit "wall/dl" w-limit "wall/wl" "longest" "1-pass" "nixenv CPU" \
    "CPU/work" "+server" "busy" "wall/floor"
for c in $COMPRESSIONS; do cat "$work/run/row-$c"; done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
fresh
cfg=$(config "$work/run/state" "$url")
NIXENV_CONFIG=$cfg /usr/bin/time -v "$NIXENV" pull "$big" >/dev/null 2>"$work/run/time.txt"
rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/run/time.txt")
echo "peak RSS of a cold nixenv pull ($c, $big_paths paths): $((rss / 1024)) MiB"

echo
fresh
cfg=$(config "$work/run/state" "$url")
NIXENV_CONFIG=$cfg "$NIXENV" pull "$small" >/dev/null 2>&1
echo "warm nixenv pull of the $small_paths-path closure:"
if command -v hyperfine >/dev/null; then
    NIXENV_CONFIG=$cfg hyperfine --warmup 3 --runs 30 -N "$NIXENV pull $small" 2>&1 |
        sed -n 's/^ *Time (mean ± σ): *\(.*\)$/  mean ± σ: \1/p; s/^ *Range (min … max): *\(.*\)$/  range: \1/p'
else
    t0=$(now)
    i=0
    while [ $i -lt 30 ]; do NIXENV_CONFIG=$cfg "$NIXENV" pull "$small" >/dev/null; i=$((i + 1)); done
    echo "  mean: $(echo "($(now) - $t0) * 1000 / 30" | bc -l | cut -c1-6) ms"
fi
