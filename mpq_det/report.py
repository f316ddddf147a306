"""The per-layer quantization table and summary, as text for the log."""
from __future__ import annotations

from .model_pass import QuantResult


def _f(v, fmt: str) -> str:
    return '-' if v is None else format(v, fmt)


def overheads(s: dict) -> str:
    """The summary's memory and compute overheads, as extra rows and as deployed on
    the target (they differ on int8, where merged points are one row)."""
    target = s.get('target', 'lowbit')
    return (f'memory overhead {s.get("memory_overhead", 0):.2%} as rows, '
            f'{s.get("memory_overhead_deployed", s.get("memory_overhead", 0)):.2%} on '
            f'{target}; compute overhead {s.get("compute_overhead", 0):.2%} as rows, '
            f'{s.get("compute_overhead_deployed", s.get("compute_overhead", 0)):.2%} on '
            f'{target}')


def format_report(res: QuantResult) -> str:
    """A fixed-width table: one row per quantized layer, then the FP layers and summary.
    mem+/mac+: the layer's overheads as extra rows; mem+T/mac+T: as deployed on the
    target."""
    head = (f'{"layer":<44} {"comp":<8} {"shape":<18} {"bits":>4} {"method":<10} '
            f'{"pts":>5} {"mem+":>6} {"mac+":>6} {"mem+T":>6} {"mac+T":>6} '
            f'{"err1":>8} {"errN":>8}')
    lines = [head, '-' * len(head)]
    for r in res.layers:
        shape = 'x'.join(str(s) for s in r['shape'])
        lines.append(
            f'{r["name"][-44:]:<44} {r["component"]:<8} {shape:<18} {r["bits"]:>4} '
            f'{r["method"]:<10} {r["points_mean"]:>5.2f} {r["mem_overhead"]:>6.1%} '
            f'{r["compute_overhead"]:>6.1%} '
            f'{r.get("mem_overhead_deployed", r["mem_overhead"]):>6.1%} '
            f'{r.get("compute_overhead_deployed", r["compute_overhead"]):>6.1%} '
            f'{_f(r["rel_err_1pt"], ".2e"):>8} '
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
        f'{overheads(s)} (mem+T, mac+T); quantization {s.get("quant_time_s", 0):.2f} s, '
        f'with calibration {s.get("calib_and_quant_time_s", 0):.2f} s')
    notes = s.get('notes') or []
    lines += [f'note: {n}' for n in notes]
    return '\n'.join(lines)


def plot_report(layers: list[dict], path: str, title: str = '') -> str:
    """Draws the per-layer report as a PNG at ``path`` and returns it.

    Per quantized layer, in model order and grouped by component: the points per
    channel (mean and max), the relative output error after one point and after the
    final points (log scale), and the bits. ``layers`` are the rows of the report
    (``QuantResult.layers`` or ``mpq_report.json['layers']``).
    """
    import matplotlib
    matplotlib.use('Agg')  # files only; never a window
    import matplotlib.pyplot as plt
    x = list(range(len(layers)))
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.22 * len(layers) + 2), 9), sharex=True)
    ax_p, ax_e, ax_b = axes
    ax_p.bar(x, [r['points_max'] for r in layers], color='#c6dbef', label='max points')
    ax_p.bar(x, [r['points_mean'] for r in layers], color='#2171b5', width=0.5,
             label='mean points')
    ax_p.set_ylabel('points per channel')
    ax_p.legend(loc='upper right', fontsize=8)
    e1 = [r.get('rel_err_1pt') for r in layers]
    eN = [r.get('rel_err_final') for r in layers]
    if any(v is not None for v in e1):
        ax_e.semilogy([i for i, v in zip(x, e1) if v], [v for v in e1 if v], 'o', ms=4,
                      color='#fb6a4a', label='after 1 point')
        ax_e.semilogy([i for i, v in zip(x, eN) if v], [v for v in eN if v], 'o', ms=4,
                      color='#67000d', label='after the final points')
        ax_e.legend(loc='upper right', fontsize=8)
    else:
        ax_e.text(0.5, 0.5, 'no output errors (rtn / mse / ocs)', ha='center',
                  transform=ax_e.transAxes)
    ax_e.set_ylabel('relative output error')
    ax_b.bar(x, [r['bits'] for r in layers], color='#6a51a3')
    ax_b.set_ylabel('bits')
    ax_b.set_xlabel('quantized layer (model order)')
    # component boundaries and names along the top
    start = 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i]['component'] != layers[start]['component']:
            for ax in axes:
                ax.axvline(i - 0.5, color='grey', lw=0.5)
            ax_p.text((start + i - 1) / 2, 1.02, layers[start]['component'], ha='center',
                      transform=ax_p.get_xaxis_transform(), fontsize=9)
            start = i
    ax_b.set_xticks(x)
    ax_b.set_xticklabels([r['name'] for r in layers], rotation=90, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
