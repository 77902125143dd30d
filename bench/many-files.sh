#!/bin/sh
# Benchmark of unpacking one NAR of many small files into the store (issue 15, item 11):
# unpack + verify-free commit of a NAR of ENTRIES files (default 100,000; 1,000 per directory,
# plus one directory and one symlink per 1,000 files) with each store durability:
# `syncfs` (one syncfs(2) per path, the default) and `fsync` (one fsync per file and directory,
# the behaviour before).
#
#   bench/many-files.sh [DIR]      (default DIR: /var/tmp; must be on a real disk, not tmpfs)
#
# Runs the ignored test `store::tests::bench_many_entries` of nixenv-core in release mode and
# prints one line per durability. syncfs also writes back any other dirty data of DIR's file
# system: on a busy machine its time includes that (look at Dirty in /proc/meminfo).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${1:-/var/tmp}
ENTRIES=${ENTRIES:-100000}
cd "$repo"
echo "== $(date -u +%FT%TZ) $(uname -r), $(nproc) cores, $(df -T "$dir" | awk 'NR==2 {print $2}') at $dir" >&2
grep -E '^(Dirty|Writeback):' /proc/meminfo >&2
NIXENV_BENCH_ENTRIES=$ENTRIES NIXENV_BENCH_DIR=$dir \
    cargo test -q -p nixenv-core --release --lib -- store::tests::bench_many_entries \
    --ignored --nocapture --test-threads 1 2>&1 | grep -E '^(Syncfs|Fsync):'
