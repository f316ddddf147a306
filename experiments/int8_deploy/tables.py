"""The mAP table of docs/deploy.md from the output of experiments/int8_deploy/run.sh.

    python experiments/int8_deploy/tables.py experiments/int8_deploy/map_table.out
"""
import re
import sys

NAMES = {'retinanet_r18q': 'RetinaNet r18q', 'fcos_r18q': 'FCOS r18q',
         'ssdlite_mbv2q': 'SSDLite MobileNetV2'}
COLS = [('fp32', 'FP32 ONNX'), ('ort_w8a8', 'ORT W8A8'), ('w8a8_int8', 'ours W8A8 int8'),
        ('w4a8_pytorch', 'W4A8 PyTorch'), ('w4a8_int8', 'W4A8 int8'),
        ('w3a8_pytorch', 'W3A8 PyTorch'), ('w3a8_int8', 'W3A8 int8'),
        ('w4a8_pow2_pytorch', 'W4A8 pow2 PyTorch'),
        ('w4a8_pow2_int8', 'W4A8 pow2 int8'), ('w3a8_pow2_int8', 'W3A8 pow2 int8')]


def main(path: str) -> None:
    val, kern = {}, {}
    for line in open(path):
        m = re.match(r'(\S+) (voc|coco) (\S+) (?:pascal_voc/mAP|bbox_mAP_copypaste): ([\d.]+)',
                     line)
        if m:
            val[m.group(1), m.group(2), m.group(3)] = 100 * float(m.group(4))
        m = re.match(r'(\S+) (voc|coco) (\S+)_deploy int8: (\d+) QLinearConv, (\d+) '
                     r'ConvInteger, (\d+) float convs.*relative L2 ([\d.e+-]+)', line)
        if m:
            kern[m.group(1), m.group(2), m.group(3)] = m.groups()[3:]
    # the columns some run printed (experiments/int8_defaults runs a subset)
    cols = [(k, c) for k, c in COLS if any(key[2] == k for key in val)]
    pairs = [(a, b, f'{label} int8 - PyTorch') for a, b, label in
             (('w4a8_int8', 'w4a8_pytorch', 'W4A8'), ('w3a8_int8', 'w3a8_pytorch', 'W3A8'),
              ('w4a8_pow2_int8', 'w4a8_pow2_pytorch', 'pow2'))
             if any(key[2] == a for key in val)]
    print('| detector | ' + ' | '.join(c for _, c in cols) + ''.join(
        f' | {label}' for _, _, label in pairs) + ' |')
    print('|' + '---|' * (len(cols) + len(pairs) + 1))
    for ds in ('voc', 'coco'):
        fmt = '.2f' if ds == 'voc' else '.1f'
        for det, name in NAMES.items():
            row = [val.get((det, ds, k)) for k, _ in cols]
            cells = ['-' if v is None else format(v, fmt) for v in row]
            d = {k: val.get((det, ds, k)) for k, _ in COLS}
            diff = [format(d[a] - d[b], '+' + fmt) if d[a] is not None and d[b] is not None
                    else '-' for a, b, _ in pairs]
            print(f'| {name}, {ds.upper()} | ' + ' | '.join(cells + diff) + ' |')
    print()
    print('int8 graphs (QLinearConv / ConvInteger / float convs, relative L2 vs PyTorch):')
    for (det, ds, g), (ql, ci, fl, l2) in sorted(kern.items()):
        print(f'  {det} {ds} {g}: {ql} / {ci} / {fl}, {l2}')


if __name__ == '__main__':
    main(sys.argv[1])
