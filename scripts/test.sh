#!/usr/bin/env bash
# Runs every test of the workspace (after scripts/setup.sh), then the Python package's
# (scripts/test_python.sh), and ends with one summary line, "tests: N passed, M failed",
# added up over all of cargo's test binaries and pytest.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The Python extension (moda-python) has no Rust tests; maturin builds it for pytest below, with
# PyO3's extension-module linking, which would compile PyO3 and numpy a second time here.
cargo test --workspace --all-targets --exclude moda-python 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
# The Python package (ffi/python) with pytest; its summary line's counts join the total.
pylog="$(mktemp)"
trap 'rm -f "$log" "$pylog"' EXIT
bash scripts/test_python.sh 2>&1 | tee "$pylog"
py_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$py_status
py_summary="$(grep -E '^=*ERROR|[0-9]+ (passed|failed|errors?)( |,|$)' "$pylog" | tail -1)"
passed=$((passed + $(echo "$py_summary" | grep -Eo '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')))
failed=$((failed + $(echo "$py_summary" | grep -Eo '[0-9]+ (failed|errors?)' | awk '{s += $1} END {print s + 0}')))
[ "$py_status" -eq 0 ] || [ -n "$py_summary" ] || failed=$((failed + 1))
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
