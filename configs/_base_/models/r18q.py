# Quarter-width ResNet-18 (base_channels=16: stages of 16/32/64/128 channels),
# trained from scratch, so BN is trained and nothing is frozen.
model = dict(
  backbone=dict(
    type='ResNet',
    depth=18,
    base_channels=16,
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=False,
    style='pytorch',
    init_cfg=None),
  data_preprocessor=dict(
    type='DetDataPreprocessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=32))
