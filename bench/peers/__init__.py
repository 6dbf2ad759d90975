"""The peers realtime is measured against, run by bench/targets.py."""
