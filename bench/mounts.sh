#!/bin/sh
# What the kernel does per mount (issue 16): a container's /nix/store as one bind and one
# read-only remount per store path under a tmpfs (runc's work for the per-path spec), against
# one read-only bind of the closure's view, in fresh mount namespaces, alternated
# (tests/src/bin/nixenv-bench-mounts.rs). Needs root.
#
#   bench/mounts.sh [PATHS] [ROUNDS]      (default 1005 paths, 20 rounds; also runs 4 paths)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/mounts.sh: run as root (mount namespaces)" >&2; exit 1; }
paths=${1:-1005}
rounds=${2:-20}
bin=$("$here/shipped-bins" nixenv-bench-mounts)
echo "machine: $(nproc) cores, $(uname -r), $(uptime | sed 's/.*load/load/')"
"$bin/nixenv-bench-mounts" 4 "$rounds"
echo
"$bin/nixenv-bench-mounts" "$paths" "$rounds"
echo "after: $(uptime | sed 's/.*load/load/')"
