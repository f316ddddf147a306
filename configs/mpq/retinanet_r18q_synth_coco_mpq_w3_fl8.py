# Multipoint W3, with the stem and the final classification/regression convs at
# 8 bits (the usual detection-PTQ setting; PAPER.md "Settings common in detection PTQ").
_base_ = ['./retinanet_r18q_synth_coco_mpq_w3.py']
custom_hooks = [dict(type='MultipointQuantHook', bits=3, method='multipoint', budget=0.05,
                     layer_bits={'backbone.conv1': 8, 'bbox_head.retina_cls': 8,
                                 'bbox_head.retina_reg': 8})]
