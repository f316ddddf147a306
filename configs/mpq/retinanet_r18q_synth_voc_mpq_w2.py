# Multipoint W2 (budget 10%, global allocation). Other settings from the command line:
#   --cfg-options custom_hooks.0.bits=4          (W4)
#   --cfg-options custom_hooks.0.method=rtn      (baselines: rtn | mse | ocs)
_base_ = ['../detectors/retinanet_r18q_synth_voc.py']
custom_hooks = [dict(type='MultipointQuantHook', bits=2, method='multipoint', budget=0.1)]
