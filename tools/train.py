"""Train a detector (mmdet's tools/train.py CLI, with mpq_det's registry entries)."""
from mmengine.runner import Runner

import mpq_det  # noqa: F401  (registers the hook, metric and compat fixes)
from mpq_det.launch import finish, load_tool_cfg, tool_parser


def main() -> None:
    p = tool_parser('Train a detector', checkpoint=False)
    p.add_argument('--resume', nargs='?', type=str, const='auto')
    args = p.parse_args()
    cfg = load_tool_cfg(args)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    Runner.from_cfg(cfg).train()
    finish()


if __name__ == '__main__':
    main()
