# Sourced by every experiments/*/run.sh. The scripts run from the repository root,
# one thread per run; their outputs go under $W (default work_dirs/experiments).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
git rev-parse HEAD   # the commit the outputs belong to
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
E="$PY tools/eval_matrix.py --threads 1"
W=${W:-work_dirs/experiments}
DETECTORS="retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q"
ONE_STAGE="retinanet_r18q fcos_r18q ssdlite_mbv2q"   # what the int8 ONNX graph covers
