#!/usr/bin/env bash
# Benchmarks on the test harness's real servers (Dovecot over TLS with XOAUTH2, the local
# Entra endpoint, a throwaway Postgres with fsync off); figures, not tests. Needs what the
# tests need (.ci/run installs it), as root for Dovecot; mbsync (package isync) is compared
# when installed.
#
#   scripts/bench.sh backlog [N=5000] [ROUNDS=3]   mbsync, a raw fetch, run --once and ingest
#                                                   (each also with attachments_in_raw),
#                                                   interleaved on the same N-message mailbox
#   scripts/bench.sh mailboxes [N=1000] [APPENDS=300]
#                                                   N mailboxes in one process: start-up, RSS,
#                                                   delivery-to-row percentiles
#
# The backlog is the shared benchmark mix (61 KB average, 35% replies), generated once
# with GEN (default ../shared/bench/gen_dataset.py, seed 42) into $BENCH_DIR (/tmp/m2t-bench-N).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-backlog}
cargo build --release --locked --bin mail2ticket --example bench
case "$mode" in
  backlog)
    n=${2:-5000}; rounds=${3:-3}
    gen=${GEN:-../shared/bench/gen_dataset.py}
    dir=${BENCH_DIR:-/tmp/m2t-bench-$n}
    if [ ! -d "$dir/cur" ]; then
      [ -f "$gen" ] || { echo "no generator at $gen: set GEN=path/to/gen_dataset.py" >&2; exit 1; }
      python3 "$gen" "$dir" "$n" 42 >/dev/null
    fi
    exec target/release/examples/bench backlog "$dir" "$rounds"
    ;;
  mailboxes)
    exec target/release/examples/bench mailboxes "${2:-1000}" "${3:-300}"
    ;;
  *) echo "usage: scripts/bench.sh backlog [N] [ROUNDS] | mailboxes [N] [APPENDS]" >&2; exit 2 ;;
esac
