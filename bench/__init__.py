"""Benchmarks: every speed figure the project claims comes from `just bench` (python -m bench).

Suites (each a module with `run(lab, report, args)`): write (manifest hashing, upload), cache (the
read-through client), mount (s3fsimg vs rclone mount vs s3fs-fuse vs boto3 vs a local copy),
scale (a 1,000,000-entry manifest). Each reports ratios against baselines measured in the same run.
"""
