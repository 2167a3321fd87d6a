"""`python -m unibcq ...`: the CLI without its console script (e.g. from a source tree on PYTHONPATH)."""

from unibcq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
