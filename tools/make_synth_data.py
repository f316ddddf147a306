"""Generate the synthetic VOC + COCO detection dataset (deterministic from --seed)."""
import argparse

from mpq_det.datasets.synth import SynthSpec, ensure_synth_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--out', default='data/synth')
    p.add_argument('--num-train', type=int, default=SynthSpec.num_train)
    p.add_argument('--num-test', type=int, default=SynthSpec.num_test)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true', help='regenerate even when the same spec exists')
    a = p.parse_args()
    spec = SynthSpec(num_train=a.num_train, num_test=a.num_test, seed=a.seed)
    ensure_synth_dataset(a.out, spec, force=a.force)


if __name__ == '__main__':
    main()
