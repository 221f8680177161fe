# The two commands of the README: `make demo` and `make test`.
.PHONY: setup test demo fmt lint

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
