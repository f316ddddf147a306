# Multipoint W4 (budget 5%, global allocation). Other settings from the command line:
#   --cfg-options custom_hooks.0.bits=3          (W3)
#   --cfg-options custom_hooks.0.method=rtn      (baselines: rtn | mse | ocs)
_base_ = ['../detectors/fcos_r18q_synth_voc.py']
custom_hooks = [dict(type='MultipointQuantHook', bits=4, method='multipoint', budget=0.05)]
