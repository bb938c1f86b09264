#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 20) with cargo-fuzz; stop at the first crash.
#
#   fuzz/run.sh            # 20 s per target
#   fuzz/run.sh 600        # the longer run documented in the README
#   fuzz/run.sh 60 tokens  # one target
#
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# The build uses its own target dir (FUZZ_TARGET_DIR, default ~/.cache/optinsync-fuzz-target,
# outside the clone so CI keeps it between runs): its compiler flags differ from the
# workspace's. Logs go to fuzz/logs/, crashes to fuzz/artifacts/TARGET/; reproduce one with
# `cargo fuzz run --debug-assertions TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-20}"
shift || true
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/optinsync-fuzz-target}"
unset RUSTFLAGS

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz/run.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# One build for all targets (debug assertions on, as in a debug build: overflow is a crash).
cargo fuzz build --debug-assertions
mkdir -p logs

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== fuzz $t (${seconds}s)"
    # corpus/ (gitignored) grows between runs; seeds/ (committed) is read only.
    if ! cargo fuzz run --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 2>"logs/$t.log"; then
        echo "fuzz/run.sh: $t crashed; see fuzz/logs/$t.log and fuzz/artifacts/$t/" >&2
        tail -n 40 "logs/$t.log" >&2
        status=1
        break
    fi
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "logs/$t.log" | tr '\n' ' '
    echo
done
exit "$status"
