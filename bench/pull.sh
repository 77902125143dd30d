#!/bin/sh
# Benchmark of `nixenv pull` against Nix 2.8 substituting the same closure, same machine,
# same cache, same HTTP server on 127.0.0.1, in one run.
#
#   bench/pull.sh [WORKDIR]        (default WORKDIR: /var/tmp/nixenv-bench)
#
# Environment: RUNS (cold runs per tool and compression, default 3), COMPRESSIONS (default
# "xz zstd"), TMPFS=1 (both tools' stores on a tmpfs: no disk in the measurement), N (big
# closure paths,
# default 240), TOTAL_MB (real binary content, default 320), NIXENV / SERVER / BENCH_DECODE
# (binaries; default: release builds in the workspace target dir, built if missing).
#
# 1. Builds with Nix a big closure (N paths, TOTAL_MB of host ELF files, a dependency chain of
#    depth 50 plus a DAG) and a 1,000-path small closure (bench/closure.nix); signs them with
#    the test key and makes xz and zstd caches (idempotent: reused on the next run).
# 2. Serves each cache with nixenv-test-server (hyper, HTTP/1.1 + h2c) on 127.0.0.1.
# 3. Cold: alternating, RUNS times: `nixenv pull ROOT` into an empty state dir, and
#    `nix-store --store DIR --realise ROOT` (Nix's substitution into a fresh chroot store)
#    with the same substituter and key. Prints medians and the ratio Nix/nixenv.
#    Then the limits of the machine for the same NARs (nixenv-bench-decode, one thread, the
#    decoder nixenv uses): the CPU time of decoding every NAR of the big closure divided by
#    the cores (the decode limit), the same for loopback transfer + decode + SHA-256 +
#    unpack (the work limit), and the longest single NAR's decode; prints nixenv/limit for
#    both, and nixenv's own CPU time against the work's (what the machine's load does not
#    change).
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
big_paths=$(nix-store -qR "$big" | wc -l)
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
serve() { # DIR NAME: serve DIR in the background, set url_NAME
    rm -f "$work/url-$2"
    "$SERVER" "$1" >"$work/url-$2" &
    pids="$pids $!"
    eval "pid_$2=\$!"
    i=0
    while [ ! -s "$work/url-$2" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    eval "url_$2=\$(cat \"\$work/url-$2\")"
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
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-6s %-12s %-12s %-8s\n' cache "nixenv (s)" "nix (s)" "nix/nixenv"
for c in $COMPRESSIONS; do
    eval "url=\$url_$c"
    rm -f "$work/run/t-nixenv" "$work/run/t-nix" "$work/run/cpu-nixenv" "$work/run/cpu-server"
    eval "server_pid=\$pid_$c"
    i=0
    while [ $i -lt "$RUNS" ]; do
        run_nix "$url" "$big" >>"$work/run/t-nix"
        run_nixenv "$url" "$big" "$server_pid" >>"$work/run/t-nixenv"
        i=$((i + 1))
    done
    a=$(median <"$work/run/t-nixenv")
    b=$(median <"$work/run/t-nix")
    eval "median_$c=\$a"
    eval "cpu_$c=\$(median <\"\$work/run/cpu-nixenv\")"
    eval "scpu_$c=\$(median <\"\$work/run/cpu-server\")"
    printf '%-6s %-12.2f %-12.2f %-8.2f   (runs: nixenv %s; nix %s)\n' "$c" "$a" "$b" \
        "$(echo "$b / $a" | bc -l)" "$(tr '\n' ' ' <"$work/run/t-nixenv")" "$(tr '\n' ' ' <"$work/run/t-nix")"
done

# The limits: the work of the pull on one thread, part by part, spread over the cores, and
# the one NAR that cannot be split. The decode limit is decoding alone (what bounds an xz
# pull); the work limit adds sending and receiving the compressed bytes over loopback, SHA-256
# of the NAR and unpacking it into the same file system as the pull's store (what bounds a
# zstd pull). HTTP, the store's bookkeeping and its durability are nixenv's own cost, not
# the limit's. With TMPFS=1 the store and the unpacking are on tmpfs, where all of the
# unpacking's CPU time is on the thread that writes; on a disk the writeback is not counted.
# nixenv's own CPU time (median over the runs) says how far it is from the limit on a machine
# it has to itself; its wall time also pays for whatever else the machine runs, the cache
# server first: "+server" is the server's CPU time during the pull (median), and "busy" the
# share of both cores the two kept busy over nixenv's wall time.
echo
echo "limits ($cores cores): CPU time (s) of one thread doing the pull's work on the same NARs, part by part"
printf '%-6s %-8s %-8s %-8s %-8s %-8s %-9s %-8s %-9s %-8s %-11s %-9s %-8s %-6s\n' cache \
    loopback decode hash unpack d-limit "wall/dl" w-limit "wall/wl" "longest" "nixenv CPU" \
    "CPU/work" "+server" "busy"
mkdir -p "$work/run/limit"
for c in $COMPRESSIONS; do
    nix-store -qR "$big" | "$BENCH_DECODE" "$work/cache-$c" "$work/run/limit" >"$work/run/limit-$c"
    val() { sed -n "s/^$1=//p" "$work/run/limit-$c"; }
    dcpu=$(val decode_cpu_s) wcpu=$(val work_cpu_s)
    dlim=$(echo "$dcpu / $cores" | bc -l)
    wlim=$(echo "$wcpu / $cores" | bc -l)
    eval "a=\$median_$c cpu=\$cpu_$c scpu=\$scpu_$c"
    printf '%-6s %-8.2f %-8.2f %-8.2f %-8.2f %-8.2f %-9.2f %-8.2f %-9.2f %-8.2f %-11.2f %-9.2f %-8.2f %-6.2f\n' \
        "$c" "$(val loopback_cpu_s)" "$dcpu" "$(val hash_cpu_s)" "$(val unpack_cpu_s)" \
        "$dlim" "$(echo "$a / $dlim" | bc -l)" "$wlim" "$(echo "$a / $wlim" | bc -l)" \
        "$(val longest_decode_s)" "$cpu" "$(echo "$cpu / $wcpu" | bc -l)" "$scpu" \
        "$(echo "($cpu + $scpu) / $cores / $a" | bc -l)"
done
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
