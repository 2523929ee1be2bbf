# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; for a GPU install a CUDA torch into .venv first (see README), it is kept.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean slicer-test dicom-tools

$(BIN)/separeg: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[dev]'
	@touch $@

# The real-MRML test tier (Testing/slicer_tier.py): Slicer's MRML and module logics from PyPI slicer-core, for
# make test only (about 190 MB to download, 800 MB installed).
$(VENV)/.slicer-core: pyproject.toml $(BIN)/separeg
	$(PIP) install -e '.[dev,slicer-core]'
	@touch $@

demo: $(BIN)/separeg
	$(BIN)/separeg demo --out demo_output

test: $(BIN)/separeg $(VENV)/.slicer-core dicom-tools
	$(BIN)/python -m pytest -q

# dciodvfy (dicom3tools) and plastimatch for Testing/test_dicom_conformance.py, installed with apt-get where that is
# possible (root or password-less sudo); without them those tests are skipped, so this step never fails.
DICOM_TOOLS := dicom3tools plastimatch
dicom-tools:
	-@command -v dciodvfy >/dev/null && command -v plastimatch >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  command -v apt-get >/dev/null && { $$SUDO apt-get install -y -q $(DICOM_TOOLS) >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q $(DICOM_TOOLS) >/dev/null 2>&1; }; }; \
	  command -v dciodvfy >/dev/null || echo "dciodvfy/plastimatch not installed (apt-get install $(DICOM_TOOLS)):" \
	    "the DICOM conformance tests are skipped"; }

# The modules' self-tests inside a real Slicer (SLICER_EXECUTABLE=/path/to/Slicer).
slicer-test: $(BIN)/separeg
	@test -n "$(SLICER_EXECUTABLE)" || { echo "set SLICER_EXECUTABLE to the Slicer launcher"; exit 2; }
	SLICER_EXECUTABLE="$(SLICER_EXECUTABLE)" $(BIN)/python -m pytest -q Testing/test_slicer_selftest.py

bench: $(BIN)/separeg
	$(BIN)/python Testing/benchmarks/bench_sis.py
	$(BIN)/python Testing/benchmarks/bench_pretrain.py
	$(BIN)/python Testing/benchmarks/bench_contour.py

clean:
	rm -rf demo_output .pytest_cache
