#!/bin/sh
# Crash-safety soak of `nixenv pull` (issue 15): SIGKILL it at KILLS (default 200) random
# points, 0-500 ms after start, against the fixture cache served over HTTP on 127.0.0.1 with
# NARs slowed by 150 ms (kills land in downloads, unpacks and commits); after every kill each
# complete path in the store must verify against its NarHash (nix-store --dump), and a last
# pull must succeed with every path verifying and no leftover.
#
#   bench/kill-pull.sh            (KILLS=200, SEED=<random>; root, needs the test fixtures'
#                                  Nix like tests/tests/pull.rs)
#
# It runs the CI test `sigkill_at_random_points_then_pull_succeeds_and_every_path_verifies`
# (5 kills there) with NIXENV_KILLS raised. SEED replays a run (printed as NIXENV_KILL_SEED).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$(dirname "$here")"
export NIXENV_KILLS=${KILLS:-200}
if [ -n "${SEED:-}" ]; then export NIXENV_KILL_SEED=$SEED; fi
start=$(date +%s)
cargo test -p nixenv-testkit --test pull \
    sigkill_at_random_points_then_pull_succeeds_and_every_path_verifies -- --nocapture
echo "== $NIXENV_KILLS kills in $(( $(date +%s) - start )) s" >&2
