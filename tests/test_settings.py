"""Settings: defaults, the model source rules, and loud failures for wrong values."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from chalicelib.errors import ConfigurationError
from chalicelib.model_store import LocalArchive, S3Archive
from chalicelib.settings import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MODEL_LOAD_DEADLINE,
    DEMO_ARCHIVE,
    FetchLimits,
    Settings,
)
from chalicelib.url_policy import HostAllowList


def test_empty_environment_gives_the_demo_model_and_defaults() -> None:
    settings = Settings.from_environ({})

    assert settings.model.location == LocalArchive(DEMO_ARCHIVE)
    assert settings.model.inference_threads == 1
    assert settings.model.backend == "auto"
    assert settings.model.load_deadline == DEFAULT_MODEL_LOAD_DEADLINE
    assert settings.fetch == FetchLimits()
    assert settings.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert settings.model.cache_dir.name == "chalice-classifier"


def test_bucket_and_key_name_an_s3_archive_and_win_over_model_path() -> None:
    settings = Settings.from_environ({"MODEL_BUCKET": "b", "MODEL_KEY": "k/model.tar.gz", "MODEL_PATH": "/x"})

    assert settings.model.location == S3Archive(bucket="b", key="k/model.tar.gz")


def test_model_path_names_a_local_archive() -> None:
    assert Settings.from_environ({"MODEL_PATH": "/models/m.tar.gz"}).model.location == LocalArchive(
        Path("/models/m.tar.gz")
    )


@pytest.mark.parametrize(
    ("present", "missing"), [("MODEL_BUCKET", "MODEL_KEY"), ("MODEL_KEY", "MODEL_BUCKET")]
)
def test_half_set_pair_names_what_is_missing(present: str, missing: str) -> None:
    with pytest.raises(ConfigurationError, match=f"'{present}' is set but '{missing}' is not"):
        Settings.from_environ({present: "x"})


def test_values_are_read() -> None:
    settings = Settings.from_environ(
        {
            "INFERENCE_THREADS": "2",
            "MODEL_BACKEND": " ONNX ",
            "FETCH_CONNECT_TIMEOUT": "1.5",
            "FETCH_READ_TIMEOUT": "2",
            "FETCH_DEADLINE": "8",
            "MAX_IMAGE_BYTES": "1000",
            "MAX_IMAGE_PIXELS": "5000",
            "MODEL_CACHE_DIR": "/var/cache/models",
            "MODEL_LOAD_DEADLINE": "12.5",
        }
    )

    assert settings.model.inference_threads == 2
    assert settings.model.backend == "onnx"
    assert settings.model.load_deadline == 12.5
    assert settings.fetch == FetchLimits(connect_timeout=1.5, read_timeout=2.0, deadline=8.0, max_bytes=1000)
    assert settings.max_image_pixels == 5000
    assert settings.model.cache_dir == Path("/var/cache/models")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INFERENCE_THREADS", "two"),
        ("INFERENCE_THREADS", "0"),
        ("MODEL_BACKEND", "tensorflow"),
        ("MAX_IMAGE_BYTES", "-1"),
        ("MAX_IMAGE_PIXELS", "1e6"),
        ("FETCH_DEADLINE", "soon"),
        ("FETCH_DEADLINE", "0"),
        ("FETCH_READ_TIMEOUT", "nan"),
        ("FETCH_CONNECT_TIMEOUT", "inf"),
    ],
)
def test_wrong_values_fail_loudly_naming_the_variable_and_the_value(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_environ({name: value})

    assert f"'{name}'" in str(raised.value)
    assert repr(value) in str(raised.value)


def test_equal_environments_give_equal_settings() -> None:
    environ = {"MODEL_BUCKET": "b", "MODEL_KEY": "k"}

    assert Settings.from_environ(environ) == Settings.from_environ(dict(environ))


def test_no_allow_list_unless_one_is_set() -> None:
    assert Settings.from_environ({}).url_policy.allowed_hosts is None
    assert Settings.from_environ({"ALLOWED_URL_HOSTS": "  "}).url_policy.allowed_hosts is None


def test_the_allow_list_is_read_into_one_canonical_form() -> None:
    allowed = Settings.from_environ(
        {"ALLOWED_URL_HOSTS": " Bücher.example , *.CDN.example., 192.0.2.1,[2001:DB8::1], 2001:db8:0::2 "}
    ).url_policy.allowed_hosts

    assert allowed == HostAllowList(
        names=frozenset({"xn--bcher-kva.example"}),
        suffixes=(".cdn.example",),
        addresses=frozenset(ipaddress.ip_address(a) for a in ("192.0.2.1", "2001:db8::1", "2001:db8::2")),
    )


def test_a_unicode_entry_and_its_idna_form_are_the_same_entry() -> None:
    assert HostAllowList.from_setting("bücher.example") == HostAllowList.from_setting(
        "XN--BCHER-KVA.EXAMPLE."
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*", "'*' alone would allow any host: leave ALLOWED_URL_HOSTS unset"),
        ("cdn.example.com,*", "'*' alone"),
        ("*.", "the name after '*.' is not a valid host name"),
        ("a*.example.com", "'*' may only be the whole first label"),
        ("*.*.example.com", "'*' may only be the whole first label"),
        ("*example.com", "'*' may only be the whole first label"),
        ("sub.*.example.com", "'*' may only be the whole first label"),
        ("**.example.com", "'*' may only be the whole first label"),
        ("*.com", "every host under a top-level domain"),
        ("cdn.example.com,,img.example.com", "entry 2 is empty"),
        ("cdn.example.com,", "entry 2 is empty"),
        (",", "entry 1 is empty"),
        ("cdn.example.com:443", "carries a port: ALLOWED_PORTS"),
        ("[2001:db8::1]:443", "carries a port"),
        ("https://cdn.example.com", "is a URL"),
        ("cdn.example.com/images", "not a valid host name"),
        ("user@cdn.example.com", "not a valid host name"),
        ("cdn.example.com\\evil.example", "not a valid host name"),
        ("cdn%2Eexample.com", "not a valid host name"),
        ("cdn example.com", "not a valid host name"),
        ("cdn..example.com", "not a valid host name"),
        ("ü" * 64 + ".example", "not a valid domain name"),
        ("192.0.2.0/24", "not a valid host name"),
        ("[cdn.example.com]", "brackets may hold only an IPv6 address"),
        ("[192.0.2.1]", "brackets may hold only an IPv6 address"),
        ("fe80::1%eth0", "zone identifier"),
        ("127.1", "ends in a number"),
        ("2130706433", "ends in a number"),
        ("0x7f.1", "ends in a number"),
        ("*.0x1", "ends in a number"),
        ("*.2.0.192", "ends in a number"),
    ],
)
def test_a_malformed_allow_list_fails_loudly(value: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_environ({"ALLOWED_URL_HOSTS": value})

    assert str(raised.value).startswith("Config 'ALLOWED_URL_HOSTS' must be a comma-separated list")
    assert says in str(raised.value)
    assert raised.value.STATUS_CODE == 503
