"""Tests for s3fsimg. ``s3fsimg_lab`` holds the S3 test lab (moto server, fault proxy, sample images)."""
