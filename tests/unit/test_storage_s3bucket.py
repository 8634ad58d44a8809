"""app/storage/s3bucket.py with moto: bucket creation, lifecycle merging, S3 settings."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError

from app.config import Config, ConfigError
from app.storage.factory import make_storage
from app.storage.s3 import S3Storage
from app.storage.s3bucket import merge_rules, rule_id, set_up_bucket
from tests.unit.test_storage_s3 import BUCKET, KEY, PREFIX, client, client_error, meta

__all__ = ["client"]  # the moto-backed S3 client fixture


# -- bucket and lifecycle -----------------------------------------------------------------------


def rules(client: Any, bucket: str = BUCKET) -> dict[str, Any]:
    try:
        found = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError:
        return {}
    return {rule["ID"]: rule for rule in found}


def test_lifecycle_merges_with_another_prefixes_rule(client: Any) -> None:
    set_up_bucket(client, BUCKET, "inst-b", 7)
    set_up_bucket(client, BUCKET, PREFIX, 28)
    found = rules(client)
    assert set(found) == {rule_id("inst-b"), rule_id(PREFIX)}
    assert found[rule_id("inst-b")]["Expiration"] == {"Days": 7}
    assert found[rule_id(PREFIX)]["Expiration"] == {"Days": 28}
    assert found[rule_id(PREFIX)]["Filter"] == {"Prefix": f"{PREFIX}/"}
    set_up_bucket(client, BUCKET, PREFIX, 3)  # a changed setting replaces only our rule
    found = rules(client)
    assert found[rule_id(PREFIX)]["Expiration"] == {"Days": 3}
    assert found[rule_id("inst-b")]["Expiration"] == {"Days": 7}


def test_lifecycle_zero_removes_only_our_rule(client: Any) -> None:
    set_up_bucket(client, BUCKET, "inst-b", 7)
    set_up_bucket(client, BUCKET, PREFIX, 28)
    set_up_bucket(client, BUCKET, PREFIX, 0)
    assert set(rules(client)) == {rule_id("inst-b")}
    set_up_bucket(client, BUCKET, "inst-b", 0)
    assert rules(client) == {}
    set_up_bucket(client, BUCKET, "inst-b", 0)  # nothing to remove: quiet


def test_lifecycle_keeps_foreign_rules_verbatim() -> None:
    foreign = {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled"}
    merged = merge_rules([foreign], "", 5)
    assert merged[0] == foreign
    assert merged[1]["ID"] == rule_id("") and merged[1]["Filter"] == {"Prefix": ""}


def test_set_up_creates_a_missing_bucket(client: Any) -> None:
    set_up_bucket(client, "fresh-bucket", PREFIX, 0)
    set_up_bucket(client, "fresh-bucket", PREFIX, 0)  # a second worker: no error
    assert "fresh-bucket" in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_set_up_tolerates_a_concurrent_create(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(**kwargs: Any) -> Any:
        raise client_error("404", "HeadBucket", 404)

    def raced(**kwargs: Any) -> Any:
        raise client_error("BucketAlreadyOwnedByYou", "CreateBucket", 409)

    monkeypatch.setattr(client, "head_bucket", missing)
    monkeypatch.setattr(client, "create_bucket", raced)
    set_up_bucket(client, BUCKET, PREFIX, 0)


def test_make_storage_builds_s3_from_config(client: Any) -> None:
    config = Config.from_env(
        {
            "PROXY_MODE": "transparent",
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": "from-config",
            "S3_PREFIX": "/team/x/",
            "S3_LIFECYCLE_DAYS": "9",
            "S3_PRESIGN_EXPIRY": "60",
            "S3_PUBLIC_ENDPOINT_URL": "https://s3.example.test:9000/",
        }
    )
    storage = make_storage(config)
    assert isinstance(storage, S3Storage)
    assert storage.object_key(KEY) == f"team/x/{KEY}"
    assert set(rules(client, "from-config")) == {rule_id("team/x")}
    url = storage.presign(KEY, meta())
    assert url is not None
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "s3.example.test:9000")
    assert parts.path == f"/from-config/team/x/{KEY}"  # path style by default
    assert "X-Amz-Expires=60" in url


# -- configuration ------------------------------------------------------------------------------


def test_s3_settings_defaults() -> None:
    config = Config.from_env({"PROXY_MODE": "transparent"})
    assert config.s3_presign_expiry == 900
    assert config.s3_public_endpoint_url is None
    assert config.s3_redirect is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("S3_PRESIGN_EXPIRY", "0"),
        ("S3_PRESIGN_EXPIRY", "soon"),
        ("S3_PRESIGN_EXPIRY", "604801"),
        ("S3_PUBLIC_ENDPOINT_URL", "s3.example.test"),
        ("S3_PUBLIC_ENDPOINT_URL", "ftp://s3.example.test"),
        ("S3_REDIRECT", "maybe"),
    ],
)
def test_invalid_s3_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"PROXY_MODE": "transparent", name: value})
    assert name in str(info.value) and value in str(info.value)


def test_s3_redirect_false_and_expiry_in_seconds() -> None:
    config = Config.from_env(
        {"PROXY_MODE": "transparent", "S3_REDIRECT": "false", "S3_PRESIGN_EXPIRY": "300s"}
    )
    assert config.s3_redirect is False
    assert config.s3_presign_expiry == 300
