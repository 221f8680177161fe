# The two commands of the README: `make demo` and `make test`.
.PHONY: setup test demo fmt lint

setup:
	bash scripts/setup.sh

# Every test of the workspace. CI (.ci/run) runs exactly this.
test: setup
	cargo test --workspace --all-targets

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

demo: setup
	@echo "The demo (train, export, describe) arrives with the trainer, exporter and SDK (issues 3-7)."
	@echo "Today: make test runs the model core against the transformers fixtures."
