#!/bin/sh
# Overhead of nixenv-runc on the subcommands that pass straight through to runc: `state`,
# `kill` and `delete` of a plain container (no nix.dev/environment annotation), each against
# runc alone, in the same run, alternating runc and nixenv-runc call by call (ABBA), so that
# load from elsewhere falls on both alike. Goal: within 5%.
#
#   bench/wrapper.sh [WORKDIR]        (default WORKDIR: a fresh temp dir, removed at the end)
#
# Environment: RUNS (calls per command, default 400; delete uses RUNS/8), RUNC (the real
# runc, default `runc` on PATH), NIXENV_RUNC_BIN (default: the release build in the workspace
# target dir, built if missing). Needs root and python3.
#
# On `state` and `kill`, nixenv-runc (a static first stage of a few kilobytes, hook/runc/)
# execs runc at once. `delete` it hands to `nixenv-hook runc`, which reads the config
# (state-dir), stats the container's pin file, then execs runc. The config used here names a
# state-dir with pins for other containers, as on a busy node. As on a node, NIXENV_RUNC is
# not set: the first stage finds runc on PATH (RUNC's directory first).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
RUNS=${RUNS:-400}
RUNC=${RUNC:-$(command -v runc)}
target=${CARGO_TARGET_DIR:-$repo/target}
WRAPPER=${NIXENV_RUNC_BIN:-$target/release/nixenv-runc}
log() { echo "== $*" >&2; }

if [ ! -x "$WRAPPER" ] || [ -z "${NIXENV_RUNC_BIN:-}" ]; then
    log "building nixenv-runc (release)"
    (cd "$repo" && cargo build --quiet --release --manifest-path hook/runc/Cargo.toml &&
        cargo build --quiet --release -p nixenv-hook --bin nixenv-hook)
fi

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
export NIXENV_CONFIG="$work/config.toml" PATH="$(dirname "$RUNC"):$PATH"
unset NIXENV_RUNC

log "runc: $RUNC ($("$RUNC" --version | head -1)); nixenv-runc: $WRAPPER"
"$RUNC" --root "$root" run -d --bundle "$bundle" bench </dev/null >/dev/null 2>&1

python3 - "$RUNC" "$WRAPPER" "$root" "$bundle" "$RUNS" <<'EOF'
import os, statistics, subprocess, sys, time

runc, wrapper, root, bundle, runs = sys.argv[1:6]
runs = int(runs)
devnull = os.open(os.devnull, os.O_RDWR)


def spawn(argv):
    """Wall time of one call, spawn to exit, in ms; stops the benchmark on a failed call."""
    t = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, os.environ,
                         file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                       (os.POSIX_SPAWN_DUP2, devnull, 1)])
    _, status = os.waitpid(pid, 0)
    dt = (time.perf_counter_ns() - t) / 1e6
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv} failed")
    return dt


def measure(sub, n, args, prepare=None, warmup=20):
    times = {"runc": [], "nixenv-runc": []}
    for i in range(warmup + n):
        order = ("runc", "nixenv-runc") if i % 2 == 0 else ("nixenv-runc", "runc")
        for who in order:
            if prepare:
                prepare()
            dt = spawn([runc if who == "runc" else wrapper, "--root", root] + args)
            if i >= warmup:
                times[who].append(dt)
    return sub, times


def create():
    subprocess.run([runc, "--root", root, "create", "--bundle", bundle, "del"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)


results = [
    measure("state", runs, ["state", "bench"]),
    measure("kill", runs, ["kill", "bench", "CONT"]),
    measure("delete", max(runs // 8, 10), ["delete", "del"], prepare=create, warmup=3),
]
print()
print("| subcommand | calls each | runc median (p10) ms | nixenv-runc median (p10) ms | ratio of medians | ratio of p10s |")
print("| --- | --- | --- | --- | --- | --- |")
worst = 0.0
for sub, t in results:
    a, b = t["runc"], t["nixenv-runc"]
    qa, qb = statistics.quantiles(a, n=10), statistics.quantiles(b, n=10)
    ma, mb = statistics.median(a), statistics.median(b)
    worst = max(worst, mb / ma)
    print(f"| {sub} | {len(a)} | {ma:.2f} ({qa[0]:.2f}) | {mb:.2f} ({qb[0]:.2f}) | {mb / ma:.3f} | {qb[0] / qa[0]:.3f} |")
print()
print(f"worst ratio of medians nixenv-runc/runc: {worst:.3f} (goal: <= 1.05)")
EOF
