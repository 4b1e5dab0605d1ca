# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv in the checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

export HF_HUB_OFFLINE := 1
export RAY_DATA_DISABLE_PROGRESS_BARS := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install browser demo test clean

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: both wheels lie on this machine's disk; the constraints keep every later install from replacing them.
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/dalle2 demo

# The studio's browser test drives Debian's chromium with chromium-driver (Selenium). Installed
# here with apt-get when run as root (CI: a fresh Debian machine); elsewhere the test is skipped
# and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null \
	  || echo "make: could not install chromium + chromium-driver: the studio's browser test will be skipped"; \
	else echo "make: not root or no apt-get: chromium + chromium-driver not installed, the studio's browser test will be skipped"; fi

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
