#!/usr/bin/env bash
# Installs libmoda: `make install PREFIX=...` runs it.
#
#   ffi/install.sh PREFIX [LIB_DIR]
#
# PREFIX/lib/libmoda.so, PREFIX/lib/libmoda.a, ONNX Runtime's shared library beside them (libmoda
# looks for it next to itself), PREFIX/include/moda.h and PREFIX/lib/pkgconfig/moda.pc. LIB_DIR
# is where libmoda.so and libmoda.a were built; without it they are built here (release).
# DESTDIR, when set, is put in front of every installed path (for packaging), not in moda.pc.
# ORT_LIB names the ONNX Runtime library to install (default: the one scripts/setup.sh put in
# .ort/); ORT_LIB=none installs none (then set ORT_DYLIB_PATH at run time, or put it next to
# the executable).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX [LIB_DIR]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$1"
case "$prefix" in
  /*) ;;
  *) prefix="$(pwd)/$prefix" ;;
esac
lib_dir="${2:-}"

if [ -z "$lib_dir" ]; then
  (cd "$root" && cargo build --release -p moda-ffi)
  target_dir="$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  lib_dir="$target_dir/release"
fi
for f in libmoda.so libmoda.a; do
  [ -f "$lib_dir/$f" ] || { echo "install: $lib_dir/$f not found" >&2; exit 1; }
done

# ONNX Runtime: the version the SDK pins, from the project's .ort/ (scripts/setup.sh).
ort_version="$(sed -n 's/^pub const PINNED_ORT_VERSION: &str = "\(.*\)";/\1/p' \
  "$root/sdk/src/runtime.rs")"
ort_lib="${ORT_LIB:-$root/.ort/$ort_version/onnxruntime/capi/libonnxruntime.so.$ort_version}"
if [ "$ort_lib" != none ] && [ ! -f "$ort_lib" ]; then
  echo "install: ONNX Runtime not found at $ort_lib; run \`make setup\` first (it installs" \
    "onnxruntime $ort_version into .ort/), or set ORT_LIB=/path/to/libonnxruntime.so.X, or" \
    "ORT_LIB=none to install without it" >&2
  exit 1
fi

version="$(sed -n 's/^#define MODA_VERSION "\(.*\)"$/\1/p' "$root/ffi/include/moda.h")"
dest="${DESTDIR:-}$prefix"
install -d "$dest/lib/pkgconfig" "$dest/include"
install -m 755 "$lib_dir/libmoda.so" "$dest/lib/libmoda.so"
install -m 644 "$lib_dir/libmoda.a" "$dest/lib/libmoda.a"
install -m 644 "$root/ffi/include/moda.h" "$dest/include/moda.h"
if [ "$ort_lib" != none ]; then
  install -m 755 "$ort_lib" "$dest/lib/$(basename "$ort_lib")"
fi
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$root/ffi/moda.pc.in" |
  grep -v '^# ' >"$dest/lib/pkgconfig/moda.pc"
echo "install: libmoda $version into $dest: lib/libmoda.so, lib/libmoda.a, include/moda.h,"
echo "  lib/pkgconfig/moda.pc$([ "$ort_lib" = none ] || echo ", lib/$(basename "$ort_lib")")"
echo "  build with: cc app.c \$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs moda)"
