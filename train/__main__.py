"""``python -m train <command>``: build data, train and evaluate."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from core.dataroot import DataRoot

DEFAULT_DATA = str(DataRoot.from_env().root)


def _demo(args: argparse.Namespace) -> int:
    from core.demo import MANIFEST, DemoConfig, build_demo
    from core.summary import summarize

    out = Path(args.out)
    if (out / MANIFEST).exists() and args.if_missing:
        built = json.loads((out / MANIFEST).read_text())["config"]
        wanted = {"seed": args.seed, "extent": args.extent, "flickr_photos": args.flickr_photos}
        differs = {k: built.get(k) for k, v in wanted.items() if built.get(k) != v}
        if differs:
            print(f"error: {out} holds another demo city ({differs}); use --force to rebuild it "
                  "or choose another --out", file=sys.stderr)
            return 2
        print(f"demo city already built in {out} (remove it to rebuild)")
        return 0
    if out.exists() and not args.force:
        print(f"error: {out} already exists; use --force to rebuild it or --if-missing to keep it",
              file=sys.stderr)
        return 2
    config = DemoConfig(seed=args.seed, extent=args.extent, flickr_photos=args.flickr_photos,
                        workers=args.workers)
    if out.exists():  # --force: build beside it, then swap, so a failed build keeps the old one
        staged = out.with_name(f"{out.name}.new")
        manifest = build_demo(staged, config, progress=not args.quiet)
        old = out.with_name(f"{out.name}.old")
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old)
    else:
        manifest = build_demo(out, config, progress=not args.quiet)
    print(f"built {out} in {manifest['elapsed_s']} s")
    print(summarize(out))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from core.summary import summarize

    print(summarize(args.data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per task."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build the synthetic Amsterdam demo city",
                               description="Build the synthetic Amsterdam (real file formats) and "
                                           "print its summary.")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--extent", default="city",
                      help="city, a district (centrum, west, nieuw-west, zuid, oost, noord, zuidoost, "
                           "westpoort, weesp) or bbox:minx,miny,maxx,maxy in RD metres")
    demo.add_argument("--out", default=DEFAULT_DATA, help="output folder (default: %(default)s)")
    demo.add_argument("--flickr-photos", type=int, default=30_000, help="Flickr photos for the whole city")
    demo.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    demo.add_argument("--if-missing", action="store_true", help="do nothing if --out is already built")
    demo.add_argument("--force", action="store_true", help="rebuild --out if it exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    summary = commands.add_parser("summary", help="summarise a data root",
                                  description="Cells, images per source, coverage per district, scores.")
    summary.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    summary.set_defaults(run=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
