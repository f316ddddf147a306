"""The per-layer quantization table and summary, as text for the log."""
from __future__ import annotations

from .model_pass import QuantResult


def _f(v, fmt: str) -> str:
    return '-' if v is None else format(v, fmt)


def format_report(res: QuantResult) -> str:
    """A fixed-width table: one row per quantized layer, then the FP layers and summary."""
    head = (f'{"layer":<44} {"comp":<8} {"shape":<18} {"bits":>4} {"method":<10} '
            f'{"pts":>5} {"mem+":>6} {"mac+":>6} {"err1":>8} {"errN":>8}')
    lines = [head, '-' * len(head)]
    for r in res.layers:
        shape = 'x'.join(str(s) for s in r['shape'])
        lines.append(
            f'{r["name"][-44:]:<44} {r["component"]:<8} {shape:<18} {r["bits"]:>4} '
            f'{r["method"]:<10} {r["points_mean"]:>5.2f} {r["mem_overhead"]:>6.1%} '
            f'{r["compute_overhead"]:>6.1%} {_f(r["rel_err_1pt"], ".2e"):>8} '
            f'{_f(r["rel_err_final"], ".2e"):>8}')
    if res.skipped:
        lines.append('kept in floating point:')
        lines += [f'  {s.name}: {s.reason}' for s in res.skipped]
    s = res.summary
    lines.append(
        f'summary: {s.get("quantized_layers", 0)} layers quantized, '
        f'{s.get("fp_layers", 0)} kept in FP; bits/weight {s.get("bits_per_weight", 0):.3f} '
        f'(all Conv/Linear weights, scales and FP layers counted; '
        f'{s.get("bits_per_quantized_weight", 0):.3f} over quantized layers); '
        f'memory overhead {s.get("memory_overhead", 0):.2%}, compute overhead '
        f'{s.get("compute_overhead", 0):.2%}; quantization {s.get("quant_time_s", 0):.2f} s, '
        f'with calibration {s.get("calib_and_quant_time_s", 0):.2f} s')
    notes = s.get('notes') or []
    lines += [f'note: {n}' for n in notes]
    return '\n'.join(lines)
