#!/usr/bin/env bash
# Runs each cargo-fuzz target for SECONDS (default 60) on stable Rust: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its nightly-only flags (-Zsanitizer=address). Crashes land in
# fuzz/artifacts/<target>/ and make the script fail; turn each into a regression test.
#   fuzz/run.sh 300          # five minutes per target
#   fuzz/run.sh 60 kernel    # one target
set -euo pipefail
secs="${1:-60}"
shift || true
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
  echo "== fuzzing $t for ${secs}s"
  mkdir -p "corpus/$t"
  cargo fuzz run --release "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 \
    -max_len=4096 -print_final_stats=1
done
