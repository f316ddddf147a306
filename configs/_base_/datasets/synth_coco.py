# The same synthetic images and classes as synth_voc.py, described by COCO json and
# scored by COCO bbox mAP@[.5:.95]. With real COCO: use mmdet's
# `configs/_base_/datasets/coco_detection.py` and set num_classes=80 (see README).
_base_ = ['./synth_voc.py']
dataset_type = 'CocoDataset'
data_root = 'data/synth/'
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        metainfo={{_base_.metainfo}},
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='VOCdevkit/VOC2007/JPEGImages/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline={{_base_.train_pipeline}},
        backend_args=None))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        metainfo={{_base_.metainfo}},
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='VOCdevkit/VOC2007/JPEGImages/'),
        test_mode=True,
        pipeline={{_base_.test_pipeline}},
        backend_args=None))
test_dataloader = val_dataloader
val_evaluator = dict(
    _delete_=True,
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric='bbox',
    format_only=False,
    backend_args=None)
test_evaluator = val_evaluator
