# The README's two commands are `make demo` and `make test`; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONHASHSEED := 0
DETECTORS := retinanet_r18q fcos_r18q faster_rcnn_r18q ssdlite_mbv2q
DEMO ?= retinanet_r18q

.PHONY: setup data demo test test-all checkpoints bench
setup:
	@MPQ_VENV=$(VENV) bash tools/setup_env.sh

data: setup
	$(PY) tools/make_synth_data.py --out data/synth

# Trained checkpoints are committed; a missing one is trained (about 10 min on 2 cores).
data/checkpoints/%.pth:
	$(PY) tools/train.py configs/detectors/$*_synth_voc.py --work-dir work_dirs/train_$*
	$(PY) tools/publish_checkpoint.py $$(cat work_dirs/train_$*/last_checkpoint) $@

checkpoints: data $(DETECTORS:%=data/checkpoints/%.pth)

demo: data data/checkpoints/$(DEMO).pth
	$(PY) tools/demo.py --detector $(DEMO)

# two workers: the tests run one torch thread each, so one worker leaves a core idle;
# a test file stays on one worker (its module fixtures, e.g. cached runs, are shared)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests -m "not slow"

test-all: setup
	$(PY) -m pytest -q tests

# errors and H forms on the trained RetinaNet's calibration statistics, then the
# RetinaNet-R50 quantization time (last line: quantize_time_s=...)
bench: data data/checkpoints/retinanet_r18q.pth
	$(PY) tools/bench_quant.py --threads 1 --config configs/detectors/retinanet_r18q_synth_voc.py \
	    --checkpoint data/checkpoints/retinanet_r18q.pth
