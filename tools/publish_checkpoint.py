"""Copy a training checkpoint's weights and meta only (drops optimizer/message_hub)."""
import argparse
import os

import mpq_det  # noqa: F401  (lets torch load mmengine checkpoints)
from mpq_det.checkpoint_io import strip_checkpoint

p = argparse.ArgumentParser(description=__doc__)
p.add_argument('src')
p.add_argument('dst')
a = p.parse_args()
strip_checkpoint(a.src, a.dst)
print(f'{a.dst}: {os.path.getsize(a.dst) / 2**20:.2f} MiB')
