# Multipoint W3 (budget 5%, global allocation). Other settings from the command line:
#   --cfg-options custom_hooks.0.bits=4          (W4)
#   --cfg-options custom_hooks.0.method=rtn      (baselines: rtn | mse | ocs)
_base_ = ['../detectors/fcos_r18q_synth_coco.py']
custom_hooks = [dict(type='MultipointQuantHook', bits=3, method='multipoint', budget=0.05)]
