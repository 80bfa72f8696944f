# One-command set-up on a fresh clone: `make demo` opens napari with the sample volume,
# `make test` runs the test suite under a virtual X server.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1 libdbus-1-3 \
	libfontconfig1 libglib2.0-0

.PHONY: demo test sysdeps benchmark

# Xvfb and the Mesa/xcb libraries Qt and napari's OpenGL canvas need on a headless machine.
sysdeps:
	@command -v xvfb-run >/dev/null && ldconfig -p | grep -q libxcb-cursor \
	|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES))

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision pinned together: timm needs torchvision, and mismatched builds fail to import
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: sysdeps $(VENV)/.installed
	$(VENV)/bin/napari-tae demo

test: sysdeps $(VENV)/.installed
	$(VENV)/bin/ruff check napari_tae training tests benchmarks
	xvfb-run -a -s "-screen 0 1280x1024x24" $(PY) -m pytest -q

# under Xvfb: bench_live_update.py drives the widget in a shown napari window; bench_zoo.py trains
# the whole model zoo (hours) and bench_keras.py needs a Python with TensorFlow, so they run on
# their own: python benchmarks/bench_zoo.py --help, python benchmarks/bench_keras.py --help
benchmark: sysdeps $(VENV)/.installed
	for script in benchmarks/bench_*.py; do case "$$script" in *bench_zoo.py|*bench_keras.py) continue;; esac; \
		echo "== $$script"; xvfb-run -a -s "-screen 0 1280x800x24" $(PY) $$script || exit 1; done
