"""Generate the synthetic VOC + COCO detection dataset (deterministic from --seed)."""
import argparse
import json
import os.path as osp

from mpq_det.datasets.synth import SynthSpec, make_synth_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--out', default='data/synth')
    p.add_argument('--num-train', type=int, default=SynthSpec.num_train)
    p.add_argument('--num-test', type=int, default=SynthSpec.num_test)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true', help='regenerate even when the same spec exists')
    a = p.parse_args()
    spec = SynthSpec(num_train=a.num_train, num_test=a.num_test, seed=a.seed)
    done = osp.join(a.out, 'SPEC.json')
    if not a.force and osp.exists(done) and json.load(open(done)) == spec.__dict__:
        print(f'{a.out} already holds this dataset ({spec}); use --force to rewrite')
        return
    make_synth_dataset(a.out, spec)


if __name__ == '__main__':
    main()
