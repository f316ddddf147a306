# 8 epochs: Faster R-CNN, slower per step on 2 CPU cores.
_base_ = ['./synth_schedule.py']
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=300),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs,
         eta_min_ratio=0.02, convert_to_iter_based=True)
]
