#!/usr/bin/env bash
# One idempotent setup step: venv, torch, mmengine/mmdet, mmcv 2.1.0 with C++ ops
# (built once, wheel cached outside the repo), and this package in editable mode.
# Every step checks its result, so a half-installed venv is never taken for a good one.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Resolved to absolute paths once, here: later steps cd into the mmcv sdist, where
# a relative path would point nowhere.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
VENV="$(abspath "${MPQ_VENV:-$ROOT/.venv}")"
CACHE="$(abspath "${MPQ_CACHE:-$HOME/.cache/mpq-det}")"
PY="$VENV/bin/python"
MMCV_VERSION=2.1.0

# mmdet itself imports mmcv, so the base check only locates it.
BASE_CHECK="import importlib.util as u, torch, torchvision, mmengine, pycocotools, numpy, matplotlib, onnx, onnxruntime, optimum.quanto, xdist; assert numpy.__version__ < '2'; assert u.find_spec('mmdet')"
# pip on these machines warns about every absent local index; keep the log readable.
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip on these machines lists every absent local index location; drop those lines
pip_() {
  "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
step() { echo "[setup] $*"; }
fail() { echo "[setup] FAILED at step '$1': $2" >&2; exit 1; }

# 1. venv. The marker is written only after the base packages import, so an
#    interrupted first run is redone rather than trusted.
if [ ! -x "$PY" ]; then
  step "creating venv at $VENV"
  python3 -m venv "$VENV" || fail venv "python3 -m venv failed"
fi
if [ ! -f "$VENV/.mpq_base_ok" ] || ! "$PY" -c "$BASE_CHECK" 2>/dev/null; then
  rm -f "$VENV/.mpq_base_ok"
  step "installing torch 2.14.1, torchvision 0.29.1, numpy<2, mmengine 0.10.7, mmdet 3.3.0"
  pip_ install -q --upgrade "pip<26" "setuptools<70" wheel || fail base "pip/setuptools upgrade"
  pip_ install -q torch==2.14.1 torchvision==0.29.1 "numpy<2" || fail base "torch install"
  pip_ install -q "numpy<2" mmengine==0.10.7 mmdet==3.3.0 pycocotools "opencv-python-headless<4.11" \
      pytest pytest-xdist ninja "optimum-quanto==0.2.7" onnx onnxruntime matplotlib || fail base "mmengine/mmdet install"
  "$PY" -c "$BASE_CHECK" \
      || fail base "imports after install"
  touch "$VENV/.mpq_base_ok"
fi

# 2. mmcv with ops: skip when the ops already import; else install a cached wheel; else build.
have_ops() { "$PY" -c "from mmcv.ops import nms, roi_align" 2>/dev/null; }
if ! have_ops; then
  mkdir -p "$CACHE"
  TORCH_V=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_V"
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    step "building mmcv $MMCV_VERSION with C++ ops (7 to 8 minutes measured on 2 cores; cached in $WHEEL_DIR)"
    # mmcv's setup.py imports pkg_resources (gone from setuptools >= 70); torch pulls a newer one.
    pip_ install -q "setuptools<70" || fail mmcv-setuptools "pip install setuptools<70"
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    pip_ download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD" || fail mmcv-download "pip download of the sdist"
    tar -xzf "$BUILD"/mmcv-$MMCV_VERSION.tar.gz -C "$BUILD" || fail mmcv-unpack "tar"
    SRC="$BUILD/mmcv-$MMCV_VERSION"
    # torch >= 2.10 headers need C++20; mmcv's setup.py asks for C++17.
    if "$PY" -c "import torch,sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v>=(2,10) else 1)"; then
      sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
      grep -q -- '-std=c++20' "$SRC/setup.py" || fail mmcv-patch "could not patch -std=c++17 in setup.py"
    fi
    (cd "$SRC" && export MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 && pip_ wheel -q --no-build-isolation --no-deps . -w "$BUILD/wheel") \
      || fail mmcv-build "pip wheel of mmcv (see the compiler output above)"
    mkdir -p "$WHEEL_DIR.tmp" && cp "$BUILD"/wheel/mmcv-*.whl "$WHEEL_DIR.tmp/" && rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  fi
  step "installing cached mmcv wheel from $WHEEL_DIR"
  pip_ install -q --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-*.whl || fail mmcv-install "pip install of the cached wheel"
  pip_ install -q addict yapf "packaging" "Pillow" pyyaml regex 2>/dev/null || true
  have_ops || fail mmcv-check "'from mmcv.ops import nms, roi_align' fails after install"
fi

# 3. this package
# checked from / so that the repo folder on sys.path does not hide a missing install
if ! (cd / && "$PY" -c "import mpq_det, os, sys; sys.exit(os.path.dirname(os.path.dirname(mpq_det.__file__)) != '$ROOT')") 2>/dev/null; then
  step "installing mpq_det (editable)"
  pip_ install -q --no-build-isolation --no-deps -e "$ROOT" || fail package "pip install -e ."
fi
step "ok: $("$PY" -c "import torch, mmcv, mmdet, mmengine; print('torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmengine', mmengine.__version__)")"
