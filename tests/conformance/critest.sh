#!/usr/bin/env bash
# critest conformance of containerd-shim-nixenv-v2: cri-tools' validation suite against a private
# containerd, with the `runc` handler (containerd's runc shim) and then the `nixenv` handler
# (our shim), and a per-spec comparison. Fails if a spec passes on runc but not on nixenv.
#
# Usage (as root):
#   CRITEST=/path/to/critest tests/conformance/critest.sh [nixenv-critest options] [-- critest args]
#
#   CRITEST                  critest binary (cri-tools' validation suite, built separately;
#                            default: `critest` on PATH). This script never builds it.
#   NIXENV_TEST_CONTAINERD   containerd binary to test against (default: `containerd` on PATH,
#                            Debian's 1.6); a 2.x binary gets a version 3 config, and the
#                            containerd-shim-runc-v2 and ctr beside it are used.
#   NIXENV_CNI_BIN_DIR       CNI plugins (default /usr/lib/cni from containernetworking-plugins).
#   NIXENV_TEST_SHIM         the shim to test (default: the dev build; e.g. the shipped build of
#                            packaging/build-shim, with nixenv-hook next to it).
#
# Options of nixenv-critest (see tests/src/bin/nixenv-critest.rs):
#   --handlers runc,nixenv   handlers to run, the first is the baseline
#   --focus REGEX / --skip REGEX   select specs (ginkgo regular expressions)
#   --out DIR                keep reports (DIR/<handler>.json), critest and containerd logs
#   --keep                   keep the whole work dir
#   --debug                  containerd (and shims) log at debug level
#
# Example:
#   CRITEST=$HOME/go/bin/critest tests/conformance/critest.sh --out /tmp/critest-1.6
#   NIXENV_TEST_CONTAINERD=/opt/containerd-2.1/bin/containerd CRITEST=… tests/conformance/critest.sh
#
# Not part of CI: CI has neither critest nor the network the image specs pull from.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p containerd-shim-nixenv-v2 -p nixenv-hook --bin containerd-shim-nixenv-v2 \
  --bin nixenv-hook
cargo build -q -p nixenv-testkit --bin nixenv-critest
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/debug/nixenv-critest" "$@"
