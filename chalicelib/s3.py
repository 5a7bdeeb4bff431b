"""S3 objects without boto3: SigV4-signed GET, HEAD and PUT over urllib3.

The function reads its model archive from S3, and the bulk worker reads
images and writes results; boto3 would cost a cold start more than the whole
of ONNX Runtime's own start (importing botocore and building a client from
its service model: about 130 ms of the ONNX container's cold start). Three
signed requests need a few dozen lines of the Signature Version 4 algorithm
instead, which the tests check against moto with authentication on (moto
verifies signatures with botocore's own signer, and IAM policies).

Where things come from, as boto3 takes them:

- credentials: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
  ``AWS_SESSION_TOKEN`` from the environment, which is how Lambda hands a
  function its role's credentials; otherwise (SnapStart's credentials
  endpoint, a developer's profile, SSO) botocore's own credential chain,
  imported only then;
- region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, else botocore's configuration;
- endpoint: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (path-style
  addressing, as S3-compatible stores such as moto expect), else the
  region's virtual-hosted endpoint (path-style for bucket names that cannot
  be a host name, such as those with dots).

Each call is bounded by the timeouts it is given; retrying is the caller's
decision (the model store shares its deadline among the attempts).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import certifi
import urllib3

EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
# A bucket name that can be the first label of a host name (no dots, no upper case).
_HOST_LABEL_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


class S3Error(Exception):
    """S3 answered with an error: its status and error Code (from the body, or made from the status)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{code} (HTTP {status})")
        self.status = status
        self.code = code


@dataclass(frozen=True)
class S3Client:
    """GET, HEAD and PUT of objects in one region, with one set of credentials."""

    region: str
    credentials: Credentials
    endpoint: str | None = None  # None: AWS's own, for the region

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> S3Client:
        # os.environ looked up now, not bound as a default: chalice.test.Client
        # replaces the module attribute with a copy for each request.
        environ = os.environ if environ is None else environ
        endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        access_key, secret_key = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if access_key and secret_key and region:
            return cls(
                region, Credentials(access_key, secret_key, environ.get("AWS_SESSION_TOKEN")), endpoint
            )
        return cls(*_from_botocore(region, access_key, secret_key), endpoint)

    def get(self, bucket: str, key: str, timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        """The object's response, its body not read yet: the caller streams it and releases it."""
        return self._request("GET", bucket, key, timeout)

    def head(self, bucket: str, key: str, timeout: urllib3.Timeout) -> Mapping[str, str]:
        """The object's headers (ETag, Content-Length, x-amz-meta-*) without its body."""
        response = self._request("HEAD", bucket, key, timeout)
        response.release_conn()
        return response.headers

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        timeout: urllib3.Timeout,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Write the object; its new ETag. ``headers`` may carry Content-Type, x-amz-meta-* and a
        condition (If-None-Match: * to create only, If-Match: an ETag to replace only that
        version): a condition that fails is an S3Error with status 412."""
        response = self._request("PUT", bucket, key, timeout, body=body, headers=headers or {})
        response.release_conn()
        return response.headers.get("ETag", "")

    def _request(
        self,
        method: str,
        bucket: str,
        key: str,
        timeout: urllib3.Timeout,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        url, host, path = self._address(bucket, key)
        signed = self._signed_headers(method, host, path, datetime.now(UTC), body=body, extra=headers or {})
        response = _pool().request(
            method,
            url,
            body=body if method == "PUT" else None,
            headers=signed,
            timeout=timeout,
            retries=False,
            preload_content=False,
            # The object's bytes as stored: an archive uploaded with a
            # Content-Encoding of gzip is still the .tar.gz we extract.
            decode_content=False,
            redirect=False,
        )
        if response.status >= 300:
            answer = response.read(64 * 1024) if method != "HEAD" else b""
            response.release_conn()
            found = _ERROR_CODE.search(answer)
            raise S3Error(response.status, found.group(1).decode() if found else _code_for(response.status))
        return response

    def _address(self, bucket: str, key: str) -> tuple[str, str, str]:
        """The URL, its Host header and its path, path-style or virtual-hosted as the endpoint wants."""
        object_path = "/" + quote(key, safe="/~")
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            path = parts.path.rstrip("/") + f"/{quote(bucket, safe='')}{object_path}"
            return f"{parts.scheme}://{parts.netloc}{path}", parts.netloc, path
        if _HOST_LABEL_BUCKET.match(bucket):
            host = f"{bucket}.s3.{self.region}.amazonaws.com"
            return f"https://{host}{object_path}", host, object_path
        host = f"s3.{self.region}.amazonaws.com"
        path = f"/{quote(bucket, safe='')}{object_path}"
        return f"https://{host}{path}", host, path

    def _signed_headers(
        self, method: str, host: str, path: str, now: datetime, *, body: bytes, extra: Mapping[str, str]
    ) -> dict[str, str]:
        """Signature Version 4 (AWS's "Authenticating Requests" for S3), every header signed."""
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_BODY_SHA256
        headers = {name.lower(): " ".join(value.split()) for name, value in extra.items()}
        headers |= {"host": host, "x-amz-content-sha256": payload, "x-amz-date": stamp}
        if self.credentials.token:
            headers["x-amz-security-token"] = self.credentials.token
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                path,
                "",
                *(f"{name}:{headers[name]}" for name in sorted(headers)),
                "",
                signed,
                payload,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = ("AWS4" + self.credentials.secret_key).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        del headers["host"]  # urllib3 sends the one it derives from the URL, which is this one
        return headers


def _code_for(status: int) -> str:
    """What S3 calls an error it gives no body for (HEAD answers have none)."""
    return {403: "Forbidden", 404: "NotFound", 412: "PreconditionFailed"}.get(status, f"HTTP{status}")


# Connections kept per host: the bulk worker reads and writes ten objects side by side.
POOL_SIZE = 10
_pools: dict[str, urllib3.PoolManager] = {}


def _pool() -> urllib3.PoolManager:
    """One connection pool per process: a model load and a bulk batch each talk to a host or two."""
    if "pool" not in _pools:
        _pools["pool"] = urllib3.PoolManager(num_pools=4, maxsize=POOL_SIZE, ca_certs=certifi.where())
    return _pools["pool"]


def forget_connections() -> None:
    """Drop pooled connections: a process restored from a snapshot must not share its parent's sockets."""
    pool = _pools.pop("pool", None)
    if pool is not None:
        pool.clear()


def _from_botocore(region: str | None, access_key: str | None, secret_key: str | None) -> tuple[Any, ...]:
    """Region and credentials from botocore's configuration chain, where the environment has none.

    Lambda hands a function its role's credentials in the environment, except
    with SnapStart (AWS_CONTAINER_CREDENTIALS_FULL_URI, which botocore reads);
    elsewhere this is a developer's profile or SSO.
    """
    import botocore.session  # noqa: PLC0415 - only where the environment lacks credentials

    session = botocore.session.get_session()
    found = session.get_credentials()
    if found is None:
        raise S3Error(403, "NoCredentials")
    frozen = found.get_frozen_credentials()
    credentials = Credentials(access_key or frozen.access_key, secret_key or frozen.secret_key, frozen.token)
    return region or session.get_config_variable("region") or "us-east-1", credentials
