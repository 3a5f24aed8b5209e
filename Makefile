# spendguard — the two quick-start commands.
#   make run   build everything, set up a demo wallet and run the daemon on 127.0.0.1:7420
#   make test  install what is missing, build every policy from source, run every test

CARGO       ?= cargo
WASM_TARGET := wasm32-unknown-unknown
POLICIES    := $(notdir $(wildcard policies/*))
BIN         := target/release/spendguard
WASM_DIR    := target/$(WASM_TARGET)/release

.PHONY: run test wasm-target build policies policy-cases clean

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

test: wasm-target policy-cases
	$(CARGO) test --release

# A demo wallet on 127.0.0.1:7420: funded, the example policies uploaded, an
# agent with them attached; prints the tokens and examples, then serves.
run: build policies
	@scripts/demo.sh

clean:
	$(CARGO) clean
