#!/bin/bash
# Speed, file size, peak memory and integer kernels of the int8 graphs in onnxruntime,
# against FP32 and onnxruntime's own W8A8: the three small detectors' VOC graphs
# (written by experiments/int8_deploy/run.sh) pinned to one core, then mmdet's
# RetinaNet-R50 at 800x1344. Run it on a quiet machine: nothing else on either core.
source "$(dirname "$0")/../common.sh"
set -e
G=$W/int8   # the graphs of experiments/int8_deploy/run.sh
args=()
for det in $ONE_STAGE; do
  args+=(--graphs $det $G/${det}_voc_fp32.onnx $G/${det}_voc_w4a8.onnx $G/${det}_voc_ort_w8a8.onnx
         --graphs ${det}_pow2 $G/${det}_voc_fp32.onnx $G/${det}_voc_w4a8_pow2.onnx)
done
taskset -c 1 $PY tools/bench_deploy.py "${args[@]}" --threads 1 --repeats 50 \
    --work-dir $W/bench_deploy | tee $W/bench_small.log
# the R50 graphs stay in $W/bench_deploy/r50 (experiments/extra_points_time profiles two)
$PY tools/bench_deploy.py --r50 --threads 1 2 --r50-repeats 7 --work-dir $W/bench_deploy | tee $W/bench_r50.log
