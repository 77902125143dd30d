#!/bin/sh
# Delta updates (issue 16): one package of an environment changes (generation N -> N+1); what
# a node downloads, and how long the update takes, with `nixenv pull` against the same change
# shipped as OCI images pulled by containerd, side by side, in one run.
#
#   bench/delta.sh [WORKDIR]       (default: a new temp dir under /var/tmp, removed on exit)
#
# Environment: RUNS (timed updates per client and case, default 3), SCALE (multiplies every
# package's size, default 1: 109 MiB of files), NIX_COMPRESSION (the binary cache's: zstd or xz, default
# zstd), OCI_COMPRESSION (the layers': zstd or gzip, default zstd), KEEP=1 (keep WORKDIR).
# The release binaries are built (cargo build --release) into $CARGO_TARGET_DIR or the
# workspace's target dir. Needs root, Debian's nix-bin, containerd and ctr; installs
# docker-registry and skopeo with apt-get if missing.
#
# 1. Builds with Nix (bench/delta.nix) an environment shaped like a Python web service, 14
#    packages of real host ELF files (see `packages` below), in three variants: N; N+1 `app`
#    (the app at the top changes: 1 store path); N+1 `lib` (libpq, deep in the closure, changes:
#    libpq, psycopg and the app get new store paths, as with any Nix rebuild).
# 2. nixenv: signs the three closures with the test key, copies them into one binary cache,
#    publishes them with `nixenv publish` as generations 1 (N), 2 (app) and 3 (lib) of
#    acme/delta, and serves cache and catalog with nixenv-test-server on 127.0.0.1, which
#    counts the body bytes it sends (--log, SIGUSR1).
# 3. OCI: the same store paths as images in two layerings, pushed with skopeo to a real
#    registry (Debian's docker-registry, distribution 2.8) on 127.0.0.1, whose access log gives
#    the body bytes it sends:
#      two-layer  like a Dockerfile image: one layer with every dependency's store path, one
#                 with the app's; a changed dependency changes the first layer;
#      per-path   like nixpkgs' dockerTools.buildLayeredImage: one layer per store path,
#                 dependencies first (the order of `nix-store -qR`).
#    Layers are deterministic tars (sorted, mtime 1, uid/gid 0) of /nix/store/<path>, so an
#    unchanged layer has the same digest in N and N+1.
# 4. Per case and run, on a fresh node: pull N (untimed), then the update to N+1 (timed, bytes
#    counted on the server side). nixenv: `nixenv pull acme/delta@1`, then `@2` or `@3` into a
#    fresh state dir. OCI: a private containerd (fresh root each run, overlayfs) and
#    `ctr images pull` (fetch and unpack) of N, then of N+1.
# Printed: per case and client, the bytes of the cold pull of N, the bytes, the number of NARs
# or blobs and the median wall time of the update, and the ratios OCI/nixenv.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# Nix with nixenv's own configuration (tests/nix/nix.conf): never the host's /etc/nix, groups
# or users (a fresh Debian has no `nixbld` group, and Nix's sandbox would hide /usr/bin).
export NIX_CONF_DIR="$repo/tests/nix" NIX_USER_CONF_FILES="$repo/tests/nix/nix.conf"
unset NIX_CONFIG
RUNS=${RUNS:-3}
SCALE=${SCALE:-1}
NIX_COMPRESSION=${NIX_COMPRESSION:-zstd}
OCI_COMPRESSION=${OCI_COMPRESSION:-zstd}
nixx() { nix --extra-experimental-features nix-command "$@"; }
log() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "bench/delta.sh: run as root (Nix, containerd)" >&2; exit 1; }
if [ $# -ge 1 ]; then
    mkdir -p "$1"
    work=$(cd "$1" && pwd)
else
    work=$(mktemp -d /var/tmp/nixenv-delta.XXXXXX)
fi

# --- everything started here stops on exit -------------------------------------------------
pids=""
ctd_pid=""
cleanup() {
    stop_containerd
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for p in $pids; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $work" >&2
    else
        rm -rf "$work"
    fi
}
stop_containerd() {
    if [ -n "$ctd_pid" ]; then
        kill "$ctd_pid" 2>/dev/null || true
        wait "$ctd_pid" 2>/dev/null || true
        ctd_pid=""
    fi
    # Snapshots are mounted only while a layer unpacks; nothing may stay mounted under work.
    grep " $work/" /proc/self/mounts | cut -d' ' -f2 | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools and binaries --------------------------------------------------------------------
missing=""
command -v docker-registry >/dev/null || missing="$missing docker-registry"
command -v skopeo >/dev/null || missing="$missing skopeo"
command -v ctr >/dev/null || missing="$missing containerd"
[ -x /usr/bin/zstd ] || missing="$missing zstd"
if [ -n "$missing" ]; then
    log "installing$missing"
    # Debian starts no service from a package installed here (policy-rc.d or no init).
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null
fi
log "release binaries (cargo build --release, up to date after the first run)"
(cd "$repo" && cargo build --quiet --release -p nixenv-cli -p nixenv-testkit --bin nixenv --bin nixenv-test-server)
NIXENV=${CARGO_TARGET_DIR:-$repo/target}/release/nixenv
SERVER=${CARGO_TARGET_DIR:-$repo/target}/release/nixenv-test-server

# --- the environment -----------------------------------------------------------------------
# NAME DEPENDENCIES MiB, dependencies before dependants; the app is last.
packages="
base - 12
zlib base 1
openssl base 8
libffi base 1
sqlite base 3
readline base 2
libpq base,openssl 4
python base,zlib,openssl,libffi,sqlite,readline 40
numpy base,python 24
requests python,openssl 4
psycopg python,libpq 3
flask python 3
gunicorn python 2
app python,numpy,requests,psycopg,flask,gunicorn 2
"
mkdir -p "$work/bootstrap"
cp /bin/busybox "$work/bootstrap/busybox"
log "choosing host ELF files for the packages"
# Files of 16 KiB … 8 MiB that are ELF, each used once, filling each package's size.
find /usr/lib /usr/libexec /usr/bin /usr/sbin -type f -size +16k -size -8M -printf '%s %p\n' 2>/dev/null |
    sort -k2 |
    perl -ne 'chomp; my ($s, $f) = split / /, $_, 2;
              open(my $h, "<", $f) or next; read($h, my $m, 4);
              print "$s $f\n" if $m eq "\x7fELF"' >"$work/elf-files.txt"
echo "$packages" | awk -v scale="$SCALE" -v files="$work/elf-files.txt" '
    NF == 3 {
        want = $3 * scale * 1024 * 1024; got = 0; line = $1 " " $2
        while (got < want) {
            if ((getline f < files) <= 0) { print "not enough ELF content on this host" > "/dev/stderr"; exit 1 }
            split(f, a, " "); got += a[1]; line = line " " a[2]
        }
        print line
    }' >"$work/manifest.txt"

log "building N and the two N+1 with Nix"
t0=$(date +%s)
build() { # VARIANT CHANGED -> root store path
    nix-build "$here/delta.nix" --quiet --max-jobs 2 --option substituters '' \
        --arg bootstrap "$work/bootstrap" --arg manifest "$work/manifest.txt" \
        --argstr changed "$2" -A root -o "$work/result-$1"
}
root_n=$(build n "")
root_app=$(build app app)
root_lib=$(build lib libpq)
log "built in $(($(date +%s) - t0)) s"

log "signing and making the $NIX_COMPRESSION binary cache"
key_pub=$(cat "$repo/tests/fixtures/keys/nixenv-test-1.pub")
nixx store sign --key-file "$repo/tests/fixtures/keys/nixenv-test-1.sec" --recursive \
    "$root_n" "$root_app" "$root_lib"
nixx copy --quiet --to "file://$work/cache?compression=$NIX_COMPRESSION&parallel-compression=true" \
    "$root_n" "$root_app" "$root_lib"

# --- servers -------------------------------------------------------------------------------
wait_for() { # TEST FILE: wait until `test TEST FILE` holds, e.g. -s (non-empty) (at most 10 s)
    tries=0
    while [ ! "$1" "$2" ] && [ $tries -lt 200 ]; do sleep 0.05; tries=$((tries + 1)); done
    [ "$1" "$2" ] || { echo "bench/delta.sh: $2 did not appear" >&2; exit 1; }
}
mkdir -p "$work/catalog"
"$SERVER" --log "$work/served.log" "$work/cache" >"$work/url-cache" &
cache_pid=$!
pids="$pids $cache_pid"
"$SERVER" --log "$work/served-catalog.log" "$work/catalog" >"$work/url-catalog" &
catalog_pid=$!
pids="$pids $catalog_pid"
wait_for -s "$work/url-cache"
wait_for -s "$work/url-catalog"
cache_url=$(cat "$work/url-cache")
catalog_url=$(cat "$work/url-catalog")

config() { # STATE_DIR -> a nixenv config file using the served cache and catalog
    printf 'state-dir = "%s"\nsubstituters = ["%s"]\ntrusted-public-keys = ["%s"]\ncatalog = "%s"\n' \
        "$1" "$cache_url" "$key_pub" "$catalog_url" >"$work/config.toml"
    echo "$work/config.toml"
}
cfg=$(config "$work/state")
for r in "$root_n" "$root_app" "$root_lib"; do
    NIXENV_CONFIG=$cfg "$NIXENV" publish --catalog "$work/catalog" acme/delta "$r" >/dev/null
done

# served_bytes: body bytes both nixenv-test-servers sent so far, and the NAR requests.
served() { # PID LOG -> "BYTES NARS"
    rm -f "$2"
    kill -USR1 "$1"
    wait_for -e "$2" # written whole, then renamed
    awk '{ b += $4 } $2 ~ /^\/nar\// { n++ } END { printf "%.0f %d\n", b, n }' "$2"
}
served_bytes() {
    set -- $(served "$cache_pid" "$work/served.log") $(served "$catalog_pid" "$work/served-catalog.log")
    echo "$(($1 + $3)) $2"
}

port=""
for p in $(seq 35000 35200); do
    if ! ss -Htln "sport = :$p" | grep -q .; then port=$p; break; fi
done
[ -n "$port" ] || { echo "bench/delta.sh: no free port for the registry" >&2; exit 1; }
registry=127.0.0.1:$port
mkdir -p "$work/registry/data"
cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $work/registry/data
  delete:
    enabled: true
http:
  addr: $registry
EOF
docker-registry serve "$work/registry/config.yml" >"$work/registry/access.log" 2>"$work/registry/error.log" &
pids="$pids $!"
tries=0
until ss -Htln "sport = :$port" | grep -q .; do
    tries=$((tries + 1))
    [ $tries -lt 200 ] || { cat "$work/registry/error.log" >&2; exit 1; }
    sleep 0.05
done

# --- OCI images ----------------------------------------------------------------------------
log "making and pushing the OCI images ($OCI_COMPRESSION layers)"
case "$OCI_COMPRESSION" in
zstd) compress() { zstd -q -3 -T0 -c; }; layer_type=application/vnd.oci.image.layer.v1.tar+zstd ;;
gzip) compress() { gzip -n -6 -c; }; layer_type=application/vnd.oci.image.layer.v1.tar+gzip ;;
*) echo "bench/delta.sh: OCI_COMPRESSION must be zstd or gzip" >&2; exit 1 ;;
esac
oci="$work/oci"
mkdir -p "$oci/blobs/sha256"
echo '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$work/policy.json"
sha() { sha256sum "$1" | cut -d' ' -f1; }
blob() { # FILE: move FILE into the layout's blobs, print "DIGEST SIZE"
    d=$(sha "$1")
    s=$(stat -c %s "$1")
    mv -f "$1" "$oci/blobs/sha256/$d"
    echo "$d $s"
}
layer() { # STORE_PATH...: make a layer, print "DIGEST SIZE DIFF_ID"
    rel=""
    for p in "$@"; do rel="$rel ${p#/}"; done
    # shellcheck disable=SC2086 # one word per path
    tar -C / --format=gnu --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -cf "$work/layer.tar" \
        --no-recursion nix nix/store --recursion $rel
    diff_id=$(sha "$work/layer.tar")
    compress <"$work/layer.tar" >"$work/layer.blob"
    rm -f "$work/layer.tar"
    echo "$(blob "$work/layer.blob") $diff_id"
}
image() { # LAYERING TAG ROOT: build and push $registry/delta/LAYERING:TAG
    closure=$(nix-store -qR "$3")
    deps=$(echo "$closure" | grep -vx "$3")
    : >"$work/layers"
    case "$1" in
    two-layer)
        # shellcheck disable=SC2086 # one word per path
        layer $deps >>"$work/layers"
        layer "$3" >>"$work/layers"
        ;;
    per-path)
        for p in $closure; do layer "$p" >>"$work/layers"; done
        ;;
    esac
    diff_ids=$(awk '{ printf "%s\"sha256:%s\"", (NR > 1 ? "," : ""), $3 }' "$work/layers")
    layers=$(awk -v t="$layer_type" '{ printf "%s{\"mediaType\":\"%s\",\"digest\":\"sha256:%s\",\"size\":%s}", (NR > 1 ? "," : ""), t, $1, $2 }' "$work/layers")
    printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=%s/bin"],"Cmd":["%s/bin/app"]},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
        "$3" "$3" "$diff_ids" >"$work/config.json"
    set -- "$1" "$2" "$3" $(blob "$work/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
        "$4" "$5" "$layers" >"$work/manifest.json"
    set -- "$1" "$2" "$3" $(blob "$work/manifest.json")
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s-%s"}}]}\n' \
        "$4" "$5" "$1" "$2" >"$oci/index.json"
    skopeo --policy "$work/policy.json" copy --quiet --dest-tls-verify=false \
        "oci:$oci:$1-$2" "docker://$registry/delta/$1:$2"
    echo "$(wc -l <"$work/layers")" >"$work/layer-count-$1-$2"
}
for layering in two-layer per-path; do
    image "$layering" n "$root_n"
    image "$layering" app "$root_app"
    image "$layering" lib "$root_lib"
done

registry_bytes() { # -> "BYTES BLOBS" sent so far (GET answers with a body; blobs: layer and config GETs)
    awk -F'"' '$2 ~ /^GET / { split($3, s, " "); if (s[2] ~ /^[0-9]+$/) b += s[2]; if ($2 ~ /\/blobs\//) n++ }
               END { printf "%.0f %d\n", b, n }' "$work/registry/access.log"
}

# --- containerd ----------------------------------------------------------------------------
ctd="$work/ctd"
start_containerd() { # a fresh root each time
    stop_containerd
    rm -rf "$ctd"
    mkdir -p "$ctd"
    cat >"$ctd/config.toml" <<EOF
version = 2
root = "$ctd/root"
state = "$ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$ctd/sock"
[ttrpc]
  address = "$ctd/sock.ttrpc"
[debug]
  address = "$ctd/sock.debug"
EOF
    containerd --config "$ctd/config.toml" >"$ctd/log" 2>&1 &
    ctd_pid=$!
    tries=0
    until ctr --address "$ctd/sock" version >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 200 ] || { cat "$ctd/log" >&2; exit 1; }
        sleep 0.05
    done
}
ctr_pull() { # LAYERING TAG
    ctr --address "$ctd/sock" --namespace delta images pull --plain-http --snapshotter overlayfs \
        "$registry/delta/$1:$2" >"$ctd/pull.log" 2>&1 || { cat "$ctd/pull.log" >&2; exit 1; }
}

# --- runs ----------------------------------------------------------------------------------
now() { date +%s.%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
generation() { case "$1" in app) echo 2 ;; lib) echo 3 ;; esac; }

# One update on a fresh node: CLIENT CASE -> "COLD_BYTES BYTES FETCHED SECONDS"
update_nixenv() {
    rm -rf "$work/state"
    cfg=$(config "$work/state")
    set -- $(served_bytes)
    b0=$1
    NIXENV_CONFIG=$cfg "$NIXENV" pull acme/delta@1 >/dev/null 2>"$work/pull.err" || { cat "$work/pull.err" >&2; exit 1; }
    set -- $(served_bytes)
    b1=$1 n1=$2
    gen=$(generation "$change")
    t0=$(now)
    NIXENV_CONFIG=$cfg "$NIXENV" pull "acme/delta@$gen" >/dev/null 2>"$work/pull.err" || { cat "$work/pull.err" >&2; exit 1; }
    t=$(echo "$(now) - $t0" | bc)
    set -- $(served_bytes)
    echo "$((b1 - b0)) $(($1 - b1)) $(($2 - n1)) $t"
}
update_oci() { # LAYERING
    start_containerd
    set -- "$1" $(registry_bytes)
    b0=$2
    ctr_pull "$1" n
    sleep 0.3 # the access log line follows the end of the body
    set -- "$1" $(registry_bytes)
    b1=$2 n1=$3
    t0=$(now)
    ctr_pull "$1" "$change"
    t=$(echo "$(now) - $t0" | bc)
    sleep 0.3
    set -- "$1" $(registry_bytes)
    stop_containerd
    echo "$((b1 - b0)) $(($2 - b1)) $(($3 - n1)) $t"
}

paths=$(nix-store -qR "$root_n" | wc -l)
size=$(nixx path-info -S "$root_n" | awk '{print $2}')
echo
echo "environment: $(echo "$packages" | awk 'NF == 3' | wc -l) packages, $paths store paths, $((size / 1024 / 1024)) MiB unpacked (NarSize of N)"
echo "changed: app = the app at the top (1 store path); lib = libpq, deep (libpq, psycopg, app: 3 store paths)"
echo "OCI layers: two-layer $(cat "$work/layer-count-two-layer-n"), per-path $(cat "$work/layer-count-per-path-n")"
echo "compression: binary cache $NIX_COMPRESSION, OCI layers $OCI_COMPRESSION; $RUNS runs, median time of the update"
echo "machine: $(nproc) cores, $(uname -r), $(uptime | sed 's/.*load/load/')"
echo
printf '%-5s %-20s %12s %12s %8s %9s %9s %9s\n' case client "cold N (B)" "update (B)" fetched "time (s)" "bytes/nx" "time/nx"
for change in app lib; do
    for client in nixenv two-layer per-path; do
        : >"$work/runs"
        run=0
        while [ $run -lt "$RUNS" ]; do
            case "$client" in
            nixenv) update_nixenv >>"$work/runs" ;;
            *) update_oci "$client" >>"$work/runs" ;;
            esac
            run=$((run + 1))
        done
        set -- $(head -n1 "$work/runs")
        cold=$1 bytes=$2 fetched=$3
        t=$(cut -d' ' -f4 "$work/runs" | median)
        if [ "$client" = nixenv ]; then
            nx_bytes=$bytes nx_t=$t
            what="$fetched NARs"
            label="nixenv pull"
        else
            what="$fetched blobs"
            label="OCI $client"
        fi
        printf '%-5s %-20s %12d %12d %8s %9.3f %9.2f %9.2f   (times: %s)\n' "$change" "$label" "$cold" "$bytes" \
            "$what" "$t" "$(echo "$bytes / $nx_bytes" | bc -l)" "$(echo "$t / $nx_t" | bc -l)" \
            "$(cut -d' ' -f4 "$work/runs" | tr '\n' ' ')"
    done
done
echo
echo "load after: $(uptime | sed 's/.*load/load/')"
