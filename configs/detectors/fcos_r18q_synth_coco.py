# Trained once on the synthetic train split (with the _voc config), scored by
# VOC mAP (_voc) or COCO mAP (_coco): both configs share images, classes and model.
_base_ = [
    '../_base_/models/fcos_r18q_fpn.py', '../_base_/datasets/synth_coco.py',
    '../_base_/schedules/synth_schedule.py', '../_base_/default_runtime.py'
]
