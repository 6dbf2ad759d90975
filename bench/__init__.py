"""The benchmark suite of realtime: ``python bench/run.py --help``."""
