# Trained once on the synthetic train split (with the _voc config), scored by
# VOC mAP (_voc) or COCO mAP (_coco): both configs share images, classes and model.
_base_ = [
    '../_base_/models/ssdlite_mbv2q.py', '../_base_/datasets/synth_coco.py',
    '../_base_/schedules/synth_schedule_24e.py', '../_base_/default_runtime.py'
]
