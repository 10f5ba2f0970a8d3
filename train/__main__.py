"""``python -m train <command>``: the same command line as ``stadsbeeld`` (:mod:`train.cli`)."""

from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
