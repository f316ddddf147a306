"""Multipoint quantization core: pure torch, no mmdet / mmengine imports."""
from .allocation import (BUDGET_ON, allocate, budget_used, compute_used,
                         multipoint_quantize)
from .baselines import (mse_clip, mse_qw, ocs, ocs_fold, ocs_split, rtn, rtn_qw)
from .feedback import (Feedback, feedback_coefficients,
                       feedback_round_reference, round_many)
from .levels import LevelRows, expanded_rows, point_levels
from .grid import (GRIDS, check_bits, check_budget, check_grid, check_max_points,
                   check_weight, code_range, minmax_scale, qmax, round_to_grid,
                   signed_scales)
from .multipoint import (DEFAULT_LLOYD, DEFAULT_N_CANDIDATES, DEFAULT_N_REFINE,
                         POINT_SCALES, PointSet, QuantizedWeight,
                         default_ratios, extend_points, feedback_step, from_single,
                         greedy_multipoint, greedy_step, joint_feedback,
                         joint_levels, merge_pow2, pow2_room, quantize_points, residual,
                         select_points)
from .packing import pack_codes, packed_nbytes, unpack_codes
from .hforms import (DEFAULT_FORM, DEFAULT_FORM_OPTS, FORMS, BlockH, DiagH, ExactH, HForm,
                     IdentityH, LowRankH, hform_from_dense, identity_hform)
from .stats import (FEEDBACK_MAX_D, InputStats, conv_patches, feedback_block_size, linear_rows,
                    random_correlated_rows, random_hform)

__all__ = [
    'BUDGET_ON', 'allocate', 'budget_used', 'compute_used', 'multipoint_quantize',
    'Feedback', 'feedback_coefficients', 'feedback_round_reference', 'feedback_step',
    'joint_feedback', 'joint_levels', 'round_many',
    'LevelRows', 'expanded_rows', 'point_levels',
    'FEEDBACK_MAX_D', 'feedback_block_size', 'mse_clip', 'mse_qw', 'ocs',
    'ocs_fold', 'ocs_split', 'rtn', 'rtn_qw', 'check_bits', 'check_budget',
    'check_max_points', 'check_weight', 'qmax', 'round_to_grid',
    'GRIDS', 'check_grid', 'code_range', 'minmax_scale', 'signed_scales',
    'DEFAULT_N_CANDIDATES', 'DEFAULT_N_REFINE', 'DEFAULT_LLOYD', 'PointSet', 'QuantizedWeight', 'default_ratios',
    'extend_points', 'from_single', 'greedy_multipoint', 'greedy_step', 'quantize_points',
    'POINT_SCALES', 'merge_pow2', 'pow2_room',
    'residual',
    'select_points', 'pack_codes', 'packed_nbytes', 'unpack_codes', 'DEFAULT_FORM',
    'DEFAULT_FORM_OPTS', 'FORMS', 'BlockH', 'DiagH', 'ExactH', 'HForm', 'IdentityH',
    'InputStats', 'LowRankH', 'conv_patches', 'hform_from_dense', 'identity_hform',
    'linear_rows', 'random_correlated_rows', 'random_hform'
]
