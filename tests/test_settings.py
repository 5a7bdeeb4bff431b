"""Settings: defaults, the model source rules, and loud failures for wrong values."""

from __future__ import annotations

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
