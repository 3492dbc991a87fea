"""Configuration: `.env` < environment < flags; bad values exit 2 before any network call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s3fsimg.config import VARIABLES, Config
from s3fsimg.errors import ConfigError
from s3fsimg.units import parse_duration, parse_size


def test_priority_dotenv_env_flags(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("S3_BUCKET=from-dotenv\nDATASET_PREFIX=p1\nDATASET_CACHE_MAX_BYTES=1G\n")
    env = {"DATASET_PREFIX": "from-env"}
    from dotenv import dotenv_values

    merged = {**{k: v for k, v in dotenv_values(dotenv).items() if v is not None}, **env}
    config = Config.load({"cache_max_bytes": "500M"}, env=merged)
    assert config.bucket == "from-dotenv"
    assert config.prefix == "from-env"
    assert config.cache_max_bytes == 500 << 20


def test_dotenv_file_is_read_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("S3_BUCKET=dotenv-bucket\nDATASET_READ_DEADLINE=5s\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("S3_BUCKET", raising=False)
    monkeypatch.delenv("DATASET_READ_DEADLINE", raising=False)
    config = Config.load()
    assert config.bucket == "dotenv-bucket"
    assert config.read_deadline == 5.0


@pytest.mark.parametrize(
    ("text", "value"), [("500M", 500 << 20), ("10G", 10 << 30), ("1T", 1 << 40), ("4096", 4096), ("1.5K", 1536)]
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["10Q", "", "-1G", "G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_durations() -> None:
    assert parse_duration("30s") == 30.0
    assert parse_duration("2m") == 120.0
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ConfigError):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-max-bytes", "10Q"], "not a size"),
        (["--addressing-style", "sideways"], "sideways"),
        (["--read-deadline", "never"], "not a duration"),
    ],
)
def test_cli_config_errors_exit_2_without_network(args: list[str], message: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "S3_BUCKET": "b", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "s3fsimg", "fetch", "x", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_bucket_exits_2(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    proc = subprocess.run([sys.executable, "-m", "s3fsimg", "upload", str(tmp_path / "d")],
                          env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    expected = "s3fsimg: error: no bucket: set S3_BUCKET (in the environment or .env) or pass --bucket"
    assert proc.stderr.strip() == expected


def test_an_empty_value_means_the_default() -> None:
    """`VAR=` in a .env file is "not set" for every variable, not an error or an empty path."""
    env = {var: "" for var in VARIABLES} | {"S3_BUCKET": "b"}
    config = Config.load(env=env)
    assert config == Config(bucket="b")
    assert Config.load({"cache_dir": "", "read_deadline": " "}, env={"S3_BUCKET": "b"}) == Config(bucket="b")


def test_region_and_retries_come_from_the_aws_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AWS_REGION (read by the AWS CLI v2 and the other SDKs, not by botocore) and the user's retry
    settings apply; without them: botocore's standard mode and 5 retries. The reader retries itself."""
    from s3fsimg.s3 import S3Store

    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    def retries(store: S3Store) -> Any:
        return store.client.meta.config.retries  # type: ignore[attr-defined]  # set at run time, not in the stubs

    config = Config(bucket="b", endpoint_url="http://127.0.0.1:9")
    assert retries(S3Store(config)) == {"mode": "standard", "total_max_attempts": 6}
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert S3Store(config).client.meta.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    store = S3Store(config)
    assert store.client.meta.region_name == "eu-west-3"
    assert retries(store) == {"mode": "adaptive", "total_max_attempts": 2}
    assert retries(S3Store(config, max_attempts=0))["total_max_attempts"] == 1
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ConfigError, match=r"AWS_PROFILE: .*no-such-profile"):
        S3Store(config)
    # a profile's own retry settings apply too
    profile = tmp_path / "aws-config"
    profile.write_text("[profile slow]\nretry_mode = legacy\nmax_attempts = 3\n")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.delenv("AWS_RETRY_MODE")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(profile))
    monkeypatch.setenv("AWS_PROFILE", "slow")
    assert retries(S3Store(config)) == {"mode": "legacy", "total_max_attempts": 3}


@pytest.mark.parametrize(("url", "message"), [
    ("http://", "not a valid URL"), ("http://exa mple", "not a valid URL"), ("http://[::1", "not a valid URL"),
    ("http://127.0.0.1:99999", "not a valid URL"), ("ftp://host", "not an http:// or https:// URL"),
    ("http://user:s3cret@host:9000", "must not contain a user name or password"),
    ("minioadmin:s3cret@localhost:9000", "must not contain a user name or password"),
    ("http:/user:s3cret@host", "must not contain a user name or password"),
    ("http://host:s3cret", "not a valid URL"),
])
def test_bad_endpoint_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.load({"endpoint_url": url}, env={"S3_BUCKET": "b"})
    assert "s3cret" not in str(info.value)


def test_bucket_names_botocore_would_refuse_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="not a bucket name"):
        Config.load({"bucket": "Bad_Bucket!!"}, env={})
    assert Config.load({"bucket": "my.bucket-1"}, env={}).bucket == "my.bucket-1"


def test_a_dotenv_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"\xff\xfeS3_BUCKET=b\n")
    with pytest.raises(ConfigError, match=r"\.env: cannot read it \(not UTF-8 text\)"):
        Config.load(dotenv=tmp_path / ".env")
