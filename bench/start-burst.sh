#!/bin/sh
# Warm start under load (issue 16 point 4): CONCURRENT pods of one environment started at once on
# a warm node, nixenv against the same pods as an ordinary image on containerd's runc shim,
# alternated round by round in one run (goal: ratio of medians and of p99 <= 1.10).
#
#   bench/start-burst.sh [WORKDIR]      (bench/start.sh in burst mode; same WORKDIR default)
#
# Environment: CONCURRENT (pods at once, default 32), RUNS (rounds per variant, default 5),
# BIG (default 0 here: 1 adds the 1,005-path variant D), and the rest of bench/start.sh's
# (NIXENV_BENCH_LOG_LEVEL, NIXENV_KEEP_CONTAINERD; not NIXENV_BENCH_STRACE).
#
# Per round and variant (tests/src/bin/nixenv-bench-start/burst.rs): CONCURRENT RunPodSandbox at
# once (timed on their own), then, once every sandbox exists, CONCURRENT pods released together,
# each timed from its own CreateContainer call through StartContainer to its own first HTTP 200
# (GET / retried every millisecond; each echoserver on a port of its own, host network); every
# answer is checked; then all pods are removed and the bench waits for every shim to exit,
# outside the timing. An untimed single round and an untimed burst per variant warm the node.
# Printed: per variant over all pods of all rounds, the median of each phase, and of
# Create+Start→answer the median, p90, p99 and max; the wall time for all pods to answer; the
# ratios A/B of the medians and of the p99; the load average before and after.
set -eu
export CONCURRENT="${CONCURRENT:-32}" BIG="${BIG:-0}"
exec "$(dirname "$0")/start.sh" "$@"
