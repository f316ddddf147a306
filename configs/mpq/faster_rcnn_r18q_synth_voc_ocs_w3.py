# Baseline ocs at W3 (budget 5%: OCS splits that many input channels; rtn/mse ignore it). Other settings from the command line:
#   --cfg-options custom_hooks.0.bits=3          (W3)
#   --cfg-options custom_hooks.0.method=rtn      (baselines: rtn | mse | ocs)
_base_ = ['../detectors/faster_rcnn_r18q_synth_voc.py']
custom_hooks = [dict(type='MultipointQuantHook', bits=3, method='ocs', budget=0.05)]
