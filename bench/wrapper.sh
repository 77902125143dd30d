#!/bin/sh
# Overhead of nixenv-runc on the subcommands that pass straight through to runc: `state`,
# `kill` and `delete` of a plain container (no nix.dev/environment annotation), each against
# runc alone, measured by hyperfine in the same run. Goal: within 5%.
#
#   bench/wrapper.sh [WORKDIR]        (default WORKDIR: a fresh temp dir, removed at the end)
#
# Environment: RUNS (hyperfine runs per command, default 200; delete uses RUNS/4), RUNC (the
# real runc, default `runc` on PATH), NIXENV_RUNC_BIN (default: the release build in the
# workspace target dir, built if missing). Needs root, hyperfine and python3.
#
# nixenv-runc reads no configuration on `state` and `kill`; on `delete` it reads the config
# (state-dir) and stats the container's pin file, then execs runc. The config used here names
# a state-dir with pins for other containers, as on a busy node.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
RUNS=${RUNS:-200}
RUNC=${RUNC:-$(command -v runc)}
target=${CARGO_TARGET_DIR:-$repo/target}
WRAPPER=${NIXENV_RUNC_BIN:-$target/release/nixenv-runc}
log() { echo "== $*" >&2; }

if [ ! -x "$WRAPPER" ] || [ -z "${NIXENV_RUNC_BIN:-}" ]; then
    log "building nixenv-runc (release)"
    (cd "$repo" && cargo build --quiet --release -p nixenv-hook --bin nixenv-runc)
fi
command -v hyperfine >/dev/null || { echo "hyperfine is required" >&2; exit 1; }

keep=${1:-}
work=${1:-$(mktemp -d /tmp/nixenv-bench-wrapper.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
root=$work/runc-root
bundle=$work/bundle
state=$work/state
cleanup() {
    for c in $("$RUNC" --root "$root" list -q 2>/dev/null); do
        "$RUNC" --root "$root" delete --force "$c" >/dev/null 2>&1 || true
    done
    [ -n "$keep" ] || rm -rf "$work"
}
trap 'cleanup' EXIT INT TERM

# A plain bundle: a static busybox sleeping.
rm -rf "$bundle" && mkdir -p "$bundle/rootfs/bin" "$state/pins"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
(cd "$bundle" && "$RUNC" spec)
python3 - "$bundle/config.json" <<'EOF'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/busybox", "sleep", "100000"]
json.dump(c, open(p, "w"), indent=1)
EOF
# A node config with a state-dir holding 200 other containers' pins.
i=0
while [ $i -lt 200 ]; do echo '{}' > "$state/pins/other-$i.json"; i=$((i + 1)); done
cat > "$work/config.toml" <<EOF
state-dir = "$state"
runc = "$RUNC"
EOF
export NIXENV_CONFIG="$work/config.toml" NIXENV_RUNC="$RUNC"

log "runc: $RUNC ($("$RUNC" --version | head -1)); nixenv-runc: $WRAPPER"
"$RUNC" --root "$root" run -d --bundle "$bundle" bench </dev/null >/dev/null 2>&1

json() { echo "$work/$1.json"; }
hyperfine -N --warmup 20 --runs "$RUNS" --export-json "$(json state)" \
    -n "runc state" "$RUNC --root $root state bench" \
    -n "nixenv-runc state" "$WRAPPER --root $root state bench"
hyperfine -N --warmup 20 --runs "$RUNS" --export-json "$(json kill)" \
    -n "runc kill" "$RUNC --root $root kill bench CONT" \
    -n "nixenv-runc kill" "$WRAPPER --root $root kill bench CONT"
# delete: each run deletes a freshly created container (created by runc in --prepare).
druns=$((RUNS / 4))
hyperfine -N --warmup 3 --runs "$druns" --export-json "$(json delete)" \
    --prepare "$RUNC --root $root create --bundle $bundle del" \
    -n "runc delete" "$RUNC --root $root delete del" \
    -n "nixenv-runc delete" "$WRAPPER --root $root delete del"

python3 - "$work" <<'EOF'
import json, sys, os
work = sys.argv[1]
print()
print("| subcommand | runc median (min) ms | nixenv-runc median (min) ms | ratio of medians | ratio of mins |")
print("| --- | --- | --- | --- | --- |")
worst = 0.0
for sub in ("state", "kill", "delete"):
    r = {x["command"]: x for x in json.load(open(os.path.join(work, sub + ".json")))["results"]}
    a, b = r["runc " + sub], r["nixenv-runc " + sub]
    ratio = b["median"] / a["median"]
    worst = max(worst, ratio)
    print(f"| {sub} | {a['median']*1e3:.2f} ({a['min']*1e3:.2f}) | {b['median']*1e3:.2f} ({b['min']*1e3:.2f}) | {ratio:.3f} | {b['min']/a['min']:.3f} |")
print()
print(f"worst ratio of medians nixenv-runc/runc: {worst:.3f} (goal: <= 1.05)")
EOF
