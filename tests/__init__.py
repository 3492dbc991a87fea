"""Tests for s3fsimg. ``tests.lab`` holds the S3 test lab (moto server, fault proxy, sample images)."""
