# spendguard — the two quick-start commands.
#   make run   build the host and the example policies, then show them deciding
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

run: build policies
	@echo
	@echo "Built $(BIN) and the example policies in $(WASM_DIR)/."
	@echo "Each example policy, checked and run against its cases in the real sandbox:"
	@for p in $(POLICIES); do \
		w=$(WASM_DIR)/$$(echo $$p | tr - _).wasm; \
		echo; echo "== $$p"; \
		$(BIN) policy check $$w | sed -n '2,3p'; \
		$(BIN) policy test $$w policies/$$p/cases.json | tail -n 1; \
	done
	@echo
	@echo "Evaluate one spend yourself:"
	@echo "  $(BIN) policy eval $(WASM_DIR)/spend_limit.wasm --request examples/request.json --config examples/spend-limit.json --history examples/history.json"
	@$(BIN) policy eval $(WASM_DIR)/spend_limit.wasm --request examples/request.json --config examples/spend-limit.json --history examples/history.json

clean:
	$(CARGO) clean
