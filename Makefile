# spendguard — the two quick-start commands.
#   make run   build everything, set up a demo wallet and run the daemon on 127.0.0.1:7420
#   make test  install what is missing, build every policy from source, run every test

CARGO       ?= cargo
WASM_TARGET := wasm32-unknown-unknown
POLICIES    := $(notdir $(wildcard policies/*))
BIN         := target/release/spendguard
WASM_DIR    := target/$(WASM_TARGET)/release

.PHONY: run test wasm-target build policies policy-cases links fuzz clean

# Every relative link of the Markdown files resolves inside the repository.
links:
	scripts/check-links.sh

# rustup does not install targets named in a toolchain file on these
# machines, so add the Wasm target here when it is missing.
wasm-target:
	@if ! rustup target list --installed 2>/dev/null | grep -qx '$(WASM_TARGET)'; then \
		echo "installing the $(WASM_TARGET) target"; \
		rustup target add $(WASM_TARGET); \
	fi

build:
	$(CARGO) build --release -p spendguard

policies: wasm-target
	$(CARGO) build --release --target $(WASM_TARGET) $(addprefix -p ,$(POLICIES))

# Every example policy against its cases file, through the real CLI.
policy-cases: build policies
	@set -e; for p in $(POLICIES); do \
		echo "== spendguard policy test $(WASM_DIR)/$$(echo $$p | tr - _).wasm policies/$$p/cases.json"; \
		$(BIN) policy test $(WASM_DIR)/$$(echo $$p | tr - _).wasm policies/$$p/cases.json; \
	done

test: wasm-target links policy-cases
	scripts/with-postgres.sh $(CARGO) test --release
	$(MAKE) fuzz

# Every fuzz target (fuzz/fuzz_targets/) for FUZZ_SECONDS each, from the
# corpus in fuzz/corpus/; a crash, panic or hang fails. New inputs go to a
# scratch directory, so the repository's corpus stays as it is; with
# FUZZ_KEEP=1 they are added to fuzz/corpus/ (then `cargo fuzz cmin` it).
# cargo-fuzz passes nightly-only flags to rustc, which the stable toolchain
# accepts with RUSTC_BOOTSTRAP=1. No sanitizer: the code is safe Rust, and
# wasmtime under ASan is very slow to build and to run. 16 codegen units
# instead of cargo-fuzz's 1 let both cores compile the big crates (cranelift).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(notdir $(basename $(wildcard fuzz/fuzz_targets/*.rs)))
FUZZ_CARGO   := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
FUZZ_BUILD   := --sanitizer none --codegen-units 16

fuzz:
	@if ! $(CARGO) fuzz --version >/dev/null 2>&1; then \
		echo "installing cargo-fuzz"; \
		$(CARGO) install cargo-fuzz --locked; \
	fi
	$(FUZZ_CARGO) build $(FUZZ_BUILD)
	@set -e; for t in $(FUZZ_TARGETS); do \
		scratch=; \
		if [ "$(FUZZ_KEEP)" != 1 ]; then scratch=$$(mktemp -d); fi; \
		echo "== fuzzing $$t for $(FUZZ_SECONDS)s"; \
		status=0; \
		$(FUZZ_CARGO) run $(FUZZ_BUILD) $$t $$scratch fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -dict=fuzz/dicts/$$t.dict -timeout=60 \
			-print_final_stats=1 || status=$$?; \
		if [ -n "$$scratch" ]; then rm -rf "$$scratch"; fi; \
		if [ $$status -ne 0 ]; then echo "fuzz target $$t failed: its input is in fuzz/artifacts/$$t/"; exit 1; fi; \
	done

# A demo wallet on 127.0.0.1:7420: funded, the example policies uploaded, an
# agent with them attached; prints the tokens and examples, then serves.
run: build policies
	@scripts/demo.sh

clean:
	$(CARGO) clean

# Decision latency: the sandbox against the same rules in Cedar and in plain
# Rust (bench/, not a default member: `cargo test` never compiles Cedar).
# Results and method: BENCHMARKS.md.
.PHONY: bench
bench: wasm-target policies
	$(CARGO) bench -p spendguard-bench
	$(CARGO) bench -p spendguard --bench daemon
