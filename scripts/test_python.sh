#!/usr/bin/env bash
# Tests the `moda` Python package (ffi/python): builds its wheel with maturin, installs it into
# the virtual environment scripts/setup.sh made (.venv-python), builds the exporter, the
# moda-sdk command line and trainer that the tests use, and runs pytest (the Ray Data tests
# start a local 2-CPU Ray cluster). Fails, never skips, when any
# of these is missing. Ends with pytest's summary line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv-python"
py="$venv/bin/python"
for tool in "$py" "$venv/bin/maturin"; do
  [ -x "$tool" ] || { echo "test_python: $tool is missing; run bash scripts/setup.sh" >&2; exit 1; }
done
"$py" -c "import pytest, numpy, PIL, pyarrow, ray" || {
  echo "test_python: pytest, numpy, pillow or ray[data] is missing in $venv; run bash scripts/setup.sh" >&2
  exit 1
}
# The exporter writes the test bundle, moda-sdk gives the results to compare with, trainer
# writes the synthetic catalog of the Ray Data tests. Built with the test profile and the same
# package and target selection as scripts/test.sh's `cargo test`, so that after it this finds
# everything built (a `cargo build -p ...` would resolve other features and compile the
# workspace and a third of its dependencies again).
cargo build --profile test --workspace --exclude moda-python --all-targets
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
# The wheel with the dev profile: it reuses the dependencies compiled above (same settings; a
# release build compiles them all again at another optimisation level, about 2 more minutes
# cold). maturin cannot take the test profile (cargo would build the library as a test
# harness). ONNX Runtime does the heavy work in these tests, so they run about as fast.
"$venv/bin/maturin" build --quiet --profile dev -i "$py" -m ffi/python/Cargo.toml -o "$wheels"
wheel=("$wheels"/moda-*.whl)
[ -f "${wheel[0]}" ] || { echo "test_python: maturin built no wheel" >&2; exit 1; }
# --no-deps: the tests use the project's ONNX Runtime (.ort/, from scripts/setup.sh), and a
# test run never downloads anything.
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "${wheel[0]}"
# From another directory, so that `import moda` finds the installed package.
cd "$root/ffi/python/tests"
"$py" -m pytest -q -p no:cacheprovider "$@" .
