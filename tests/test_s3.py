"""The S3 reader's signatures, checked by a moto server that authenticates every request.

moto recomputes each request's Signature Version 4 with botocore's own
signer and checks the caller's IAM policy, once its first few (setup)
requests are through: so a wrong signature, a wrong key or a missing
permission fails here as it would on AWS.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import boto3
import pytest
import urllib3

from chalicelib.s3 import Credentials, S3Client, S3Error
from tests.support.chalice_local import free_port

BUCKET = "signed"
KEYS = ("model.tar.gz", "models/my model+v2 ü~(1).tar.gz")
BODY = b"the archive's bytes"
# Stored with Content-Encoding: gzip, as `aws s3 cp --content-encoding gzip` uploads an archive.
ENCODED_KEY, ENCODED_BODY = "encoded.tar.gz", gzip.compress(BODY)
TIMEOUT = urllib3.Timeout(connect=5, read=5)
# The requests moto lets through unauthenticated: the setup below, one each.
SETUP_REQUESTS = 15


def _iam_user(iam: object, name: str, policy: str | None) -> Credentials:
    iam.create_user(UserName=name)  # type: ignore[attr-defined]
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=policy)  # type: ignore[attr-defined]
    key = iam.create_access_key(UserName=name)["AccessKey"]  # type: ignore[attr-defined]
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="module")
def authenticating_s3() -> Iterator[tuple[str, Credentials, Credentials, Credentials]]:
    """A moto server that checks signatures and policies: a reader's keys, keys with no permission,
    and a writer's, who may read and write under results/."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", **setup)
        policy = (
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", '
            f'"Resource": "arn:aws:s3:::{BUCKET}/*"}}]}}'
        )
        reader = _iam_user(iam, "reader", policy)
        nobody = _iam_user(iam, "nobody", None)
        writer = _iam_user(
            iam, "writer", policy.replace('"s3:GetObject"', '["s3:GetObject", "s3:PutObject"]')
        )
        s3 = boto3.client("s3", **setup)
        s3.create_bucket(Bucket=BUCKET)
        for key in KEYS:
            s3.put_object(Bucket=BUCKET, Key=key, Body=BODY)
        s3.put_object(Bucket=BUCKET, Key=ENCODED_KEY, Body=ENCODED_BODY, ContentEncoding="gzip")
        yield endpoint, reader, nobody, writer
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("key", KEYS)
def test_a_signed_get_and_head_read_the_object(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials], key: str
) -> None:
    endpoint, reader, *_ = authenticating_s3
    s3 = S3Client("us-east-1", reader, endpoint)

    response = s3.get(BUCKET, key, TIMEOUT)
    body = response.read()
    response.release_conn()
    headers = s3.head(BUCKET, key, TIMEOUT)

    assert body == BODY
    assert int(headers["Content-Length"]) == len(BODY)
    assert headers["ETag"].strip('"')


def test_an_object_stored_with_a_content_encoding_is_read_as_stored(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials],
) -> None:
    """urllib3 would inflate it, and the store would then find no gzip stream to extract."""
    endpoint, reader, *_ = authenticating_s3

    response = S3Client("us-east-1", reader, endpoint).get(BUCKET, ENCODED_KEY, TIMEOUT)
    body = response.read()
    response.release_conn()

    assert (response.headers["Content-Encoding"], body) == ("gzip", ENCODED_BODY)


def test_a_wrong_secret_is_refused_as_a_bad_signature(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials],
) -> None:
    endpoint, reader, *_ = authenticating_s3
    forged = Credentials(reader.access_key, reader.secret_key[::-1])

    with pytest.raises(S3Error) as refused:
        S3Client("us-east-1", forged, endpoint).get(BUCKET, KEYS[0], TIMEOUT)

    assert (refused.value.status, refused.value.code) == (403, "SignatureDoesNotMatch")


def test_a_role_without_get_object_is_refused(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials],
) -> None:
    endpoint, _, nobody, _ = authenticating_s3

    with pytest.raises(S3Error) as refused:
        S3Client("us-east-1", nobody, endpoint).get(BUCKET, KEYS[0], TIMEOUT)

    assert (refused.value.status, refused.value.code) == (403, "AccessDenied")


def test_a_missing_object_names_its_code(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials],
) -> None:
    endpoint, reader, *_ = authenticating_s3
    s3 = S3Client("us-east-1", reader, endpoint)

    with pytest.raises(S3Error) as missing:
        s3.get(BUCKET, "nothing/here", TIMEOUT)
    with pytest.raises(S3Error) as missing_head:
        s3.head(BUCKET, "nothing/here", TIMEOUT)

    assert (missing.value.status, missing.value.code) == (404, "NoSuchKey")
    assert (missing_head.value.status, missing_head.value.code) == (404, "NotFound")


def test_the_environment_is_read_as_boto3_reads_it() -> None:
    environ = {
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9/",
    }

    reader = S3Client.from_environment(environ)

    assert reader == S3Client("eu-west-1", Credentials("AKID", "secret", "token"), "http://127.0.0.1:9/")


@pytest.mark.parametrize(
    ("bucket", "url"),
    [
        ("my-models", "https://my-models.s3.eu-west-1.amazonaws.com/a/b%20c.tar.gz"),
        ("my.models", "https://s3.eu-west-1.amazonaws.com/my.models/a/b%20c.tar.gz"),
    ],
    ids=["virtual-hosted", "path-style for a dotted name"],
)
def test_aws_endpoints_are_virtual_hosted_where_the_bucket_name_allows(bucket: str, url: str) -> None:
    reader = S3Client("eu-west-1", Credentials("AKID", "secret"))

    assert reader._address(bucket, "a/b c.tar.gz")[0] == url


def test_a_signed_put_writes_the_object_with_its_metadata_and_conditions(
    authenticating_s3: tuple[str, Credentials, Credentials, Credentials],
) -> None:
    """What the bulk worker writes: a result with metadata, created only if absent, replaced only
    if unchanged; the reader's keys may not write at all."""
    endpoint, reader, _, writer = authenticating_s3
    s3 = S3Client("us-east-1", writer, endpoint)
    headers = {"Content-Type": "application/json", "x-amz-meta-status": "ok", "If-None-Match": "*"}

    first = s3.put(BUCKET, "results/a b+c.json", b'{"class": "tabby"}', TIMEOUT, headers)
    with pytest.raises(S3Error) as exists:
        s3.put(BUCKET, "results/a b+c.json", b"{}", TIMEOUT, headers)
    with pytest.raises(S3Error) as changed:
        s3.put(BUCKET, "results/a b+c.json", b"{}", TIMEOUT, {"If-Match": '"not-its-etag"'})
    replace = {"Content-Type": "application/json", "If-Match": first}
    second = s3.put(BUCKET, "results/a b+c.json", b'{"class": "tiger"}', TIMEOUT, replace)
    with pytest.raises(S3Error) as forbidden:
        S3Client("us-east-1", reader, endpoint).put(BUCKET, "results/x.json", b"{}", TIMEOUT)

    response = s3.get(BUCKET, "results/a b+c.json", TIMEOUT)
    body = response.read()
    response.release_conn()
    assert (exists.value.status, changed.value.status, forbidden.value.status) == (412, 412, 403)
    assert first != second
    assert body == b'{"class": "tiger"}'
    assert response.headers["Content-Type"] == "application/json"
