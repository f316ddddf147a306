import json
R='/work/wt9/work_dirs'
dets=[('retinanet_r18q','RetinaNet r18q'),('faster_rcnn_r18q','Faster R-CNN r18q'),('fcos_r18q','FCOS r18q'),('ssdlite_mbv2q','SSDLite')]
FP={'retinanet_r18q':(51.00,33.70),'faster_rcnn_r18q':(66.62,50.40),'fcos_r18q':(57.64,41.40),'ssdlite_mbv2q':(52.86,35.30)}
# README main table (before), W4 rows
BEFORE_W4={'retinanet_r18q':(49.37,32.60),'faster_rcnn_r18q':(66.31,50.10),'fcos_r18q':(56.99,40.10),'ssdlite_mbv2q':(52.88,35.10)}
def get(cfg, det, run):
    wd=f'{R}/{cfg}/{det}/{run}_both'
    try:
        m=json.load(open(f'{wd}/metrics.json')); s=json.load(open(f'{wd}/mpq_report.json'))['summary']
    except FileNotFoundError:
        return None
    return dict(voc=100*m['pascal_voc/mAP'], coco=100*m['coco/bbox_mAP'], mem=100*s['memory_overhead'],
                comp=100*s['compute_overhead'], q=s['quant_time_s'], cq=s['calib_and_quant_time_s'], s=s['settings'])
out=[]
out.append('| detector | bits (budget) | FP | before: VOC / COCO (compute) | after: VOC / COCO (mem, compute) | loss after, VOC / COCO | quant s / calib+quant s after |')
out.append('|---|---|---|---|---|---|---|')
for det,label in dets:
    for run,bb in (('mpq_w4','W4 (0.05)'),('mpq_w3','W3 (0.05)'),('mpq_w2','W2 (0.10)')):
        fp=FP[det]
        if run=='mpq_w4':
            b=BEFORE_W4[det]; bcell=f'{b[0]:.2f} / {b[1]:.1f} (README)'
            a=get('D_fbjoint_both',det,run)
        else:
            b=get('A_nofb_mem',det,run); bcell=f"{b['voc']:.2f} / {b['coco']:.1f} ({b['comp']:.1f}%)"
            b=(b['voc'],b['coco'])
            a=get('F_default',det,run)
        acell='-' if a is None else f"{a['voc']:.2f} / {a['coco']:.1f} ({a['mem']:.1f}%, {a['comp']:.1f}%)"
        lcell='-' if a is None else f"{fp[0]-a['voc']:.2f} / {fp[1]-a['coco']:.1f}"
        tcell='-' if a is None else f"{a['q']:.2f} / {a['cq']:.2f}"
        out.append(f'| {label} | {bb} | {fp[0]:.2f} / {fp[1]:.1f} | {bcell} | {acell} | {lcell} | {tcell} |')
print('\n'.join(out)); print()
cfgs=[('A_nofb_mem','A: no feedback, memory (before)'),('B_nofb_both','B: no feedback, both'),('C_fbjoint_mem','C: feedback, memory'),
      ('D_fbjoint_both','D: feedback without act-order, both'),('E_fbfirst_both',"E: feedback 'first', both"),('F_default','F: defaults (feedback, both)'),('G_default_bc','G: defaults + bias correction')]
for run,bb in (('mpq_w3','W3, budget 0.05'),('mpq_w2','W2, budget 0.10')):
    print(f'{bb}: VOC / COCO (x100), then memory / compute overhead\n')
    print('| run | '+' | '.join(l for _,l in dets)+' | mean COCO |'); print('|---'*(len(dets)+2)+'|')
    for c,l in cfgs:
        cells=[]; cs=[]
        for det,_ in dets:
            v=get(c,det,run)
            if v is None: cells.append('-'); continue
            cs.append(v['coco'])
            cells.append(f"{v['voc']:.2f} / {v['coco']:.1f} ({v['mem']:.1f}%, {v['comp']:.1f}%)")
        mean = f'{sum(cs)/len(cs):.2f}' if len(cs)==4 else '-'
        print(f'| {l} | '+' | '.join(cells)+f' | {mean} |')
    print()
