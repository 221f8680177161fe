# The two commands of the README: `make demo` and `make test`.
.PHONY: setup test demo fmt lint install header

setup:
	bash scripts/setup.sh

# Every test of the workspace. CI (.ci/run) runs exactly this.
test: setup
	bash scripts/test.sh

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The main job: synthetic catalog -> train (tiny preset, CPU) -> evaluate -> export (demo/).
demo: setup
	bash scripts/demo.sh

# libmoda, the C API: lib/libmoda.so, lib/libmoda.a, ONNX Runtime beside them, include/moda.h
# and lib/pkgconfig/moda.pc under PREFIX (release build; see ffi/install.sh for DESTDIR and
# ORT_LIB). Then: cc app.c $(PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs moda)
PREFIX ?= /usr/local
# Where libmoda.so and libmoda.a were built already (the tests pass theirs); empty builds them.
MODA_LIB_DIR ?=
install:
	bash ffi/install.sh "$(PREFIX)" "$(MODA_LIB_DIR)"

# Regenerates ffi/include/moda.h from ffi/src with cbindgen (a test checks it is up to date).
header:
	MODA_UPDATE_HEADER=1 cargo test -p moda-tests --test ffi header_matches_the_code
