# Synthetic shapes in PASCAL VOC layout, scored by VOC2007's 11-point mAP@0.5.
# With real VOC: use mmdet's `configs/_base_/datasets/voc0712.py` instead and set
# the head's num_classes=20 (see README).
dataset_type = 'VOCDataset'
data_root = 'data/synth/VOCdevkit/'
classes = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'diamond', 'hexagon')
metainfo = dict(classes=classes)
img_scale = (256, 256)
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    # loading is ~5% of a step here; workers on 2 cores only oversubscribe them
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='VOC2007/ImageSets/Main/trainval.txt',
        data_prefix=dict(sub_data_root='VOC2007/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4, bbox_min_size=4),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='VOC2007/ImageSets/Main/test.txt',
        data_prefix=dict(sub_data_root='VOC2007/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

# NamedVOCMetric is mmdet's VOCMetric that prints this dataset's class names
# (mmdet's prints VOC's own names for any dataset under a VOC2007 folder).
val_evaluator = dict(type='NamedVOCMetric', metric='mAP', eval_mode='11points')
test_evaluator = val_evaluator
custom_imports = dict(imports=['mpq_det'], allow_failed_imports=False)
