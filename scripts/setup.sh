#!/usr/bin/env bash
# Installs what building and testing MODA needs on a fresh Debian machine. Idempotent: it
# installs only what is missing. Used by `make test` (and so by CI) and `make demo`.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# The C API's tests (tests/tests/ffi.rs) build C and C++ programs and run them under valgrind.
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
# The Python package's tests (scripts/test_python.sh) run in a virtual environment.
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || {
  echo "setup: cargo not found; install Rust (https://rustup.rs) and run again" >&2
  exit 1
}
# ONNX Runtime's shared library, from the PyPI wheel, into the project (.ort/, git-ignored).
# The `ort` crate loads it at run time (load-dynamic); sdk/src/runtime.rs finds it here. Keep
# the version in step with PINNED_ORT_VERSION in sdk/src/runtime.rs (it needs API level 31+).
ORT_VERSION=1.32.0
ONNX_VERSION=1.23.2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ort_lib="$root/.ort/$ORT_VERSION/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$ort_lib" ]; then
  command -v python3 >/dev/null 2>&1 || { echo "setup: python3 (with pip) is needed to fetch onnxruntime" >&2; exit 1; }
  echo "setup: installing onnxruntime $ORT_VERSION into .ort/$ORT_VERSION"
  rm -rf "$root/.ort/$ORT_VERSION.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$root/.ort/$ORT_VERSION.partial" "onnxruntime==$ORT_VERSION"
  rm -rf "$root/.ort/$ORT_VERSION"
  mv "$root/.ort/$ORT_VERSION.partial" "$root/.ort/$ORT_VERSION"
fi
# The `onnx` Python package, for the exporter test that runs onnx.checker on every graph.
if [ ! -f "$root/.ort/py/onnx-$ONNX_VERSION.stamp" ]; then
  echo "setup: installing onnx $ONNX_VERSION into .ort/py"
  rm -rf "$root/.ort/py"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$root/.ort/py" "onnx==$ONNX_VERSION"
  touch "$root/.ort/py/onnx-$ONNX_VERSION.stamp"
fi
# The Python package (ffi/python) is built with maturin and tested with pytest, numpy, Pillow
# and Ray Data in a virtual environment of the project (.venv-python/, git-ignored).
PY_TEST_PACKAGES=("maturin==1.16.0" "pytest==9.2.0" "numpy==2.4.6" "pillow==13.0.0" "ray[data]==2.60.0")
py_stamp="$root/.venv-python/moda-test-packages.txt"
if [ "$(cat "$py_stamp" 2>/dev/null)" != "${PY_TEST_PACKAGES[*]}" ]; then
  echo "setup: installing ${PY_TEST_PACKAGES[*]} into .venv-python"
  [ -x "$root/.venv-python/bin/python" ] || python3 -m venv "$root/.venv-python"
  "$root/.venv-python/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${PY_TEST_PACKAGES[@]}"
  echo "${PY_TEST_PACKAGES[*]}" > "$py_stamp"
fi
echo "setup: ok"
