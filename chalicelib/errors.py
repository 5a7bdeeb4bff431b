"""The one exception tree of the service.

Every error a caller can cause, or that the service can hit while serving, is a
leaf below ``ClassifierError``. Each leaf carries its HTTP status, and Chalice
turns any ``ChaliceViewError`` into ``{"Code": <class name>, "Message": ...}``,
so views need no ``try``/``except`` and the class name is the stable ``Code``
clients may branch on. Leaves also subclass the matching builtin, as requests
and httpx do, so library-style callers can catch ``ValueError`` or
``TimeoutError`` without knowing this module::

    ClassifierError (ChaliceViewError)
    ├── InvalidRequest (ValueError)           400  body or field is wrong
    │   └── InvalidURL                        400  not http(s), or refused by policy
    ├── ImageTooLarge (ValueError)            413  over the byte or pixel cap
    ├── UnsupportedImage (ValueError)         422  not a decodable image of an allowed format
    ├── UpstreamError (ConnectionError)       502  image host failed or answered an error
    ├── UpstreamTimeout (TimeoutError)        504  image host too slow
    ├── ModelUnavailable (RuntimeError)       503  model archive missing, unreadable or invalid
    │   └── TorchUnavailable                  503  PyTorch's layer cannot be loaded or imported
    ├── ConfigurationError (RuntimeError)     503  the environment is set wrongly
    ├── ObjectUnavailable (LookupError)       404  a bulk input is missing or not ours to read
    └── InternalError (RuntimeError)          500  one batch item hit a bug of ours (logged)

Messages say what was expected and what arrived; they never carry stack
traces, credentials or the contents of the model bucket.
"""

from __future__ import annotations

from chalice import ChaliceViewError


class ClassifierError(ChaliceViewError):
    STATUS_CODE = 500


class InvalidRequest(ClassifierError, ValueError):
    STATUS_CODE = 400


class InvalidURL(InvalidRequest):
    STATUS_CODE = 400


class ImageTooLarge(ClassifierError, ValueError):
    STATUS_CODE = 413


class UnsupportedImage(ClassifierError, ValueError):
    STATUS_CODE = 422


class UpstreamError(ClassifierError, ConnectionError):
    STATUS_CODE = 502


class UpstreamTimeout(ClassifierError, TimeoutError):
    STATUS_CODE = 504


class ModelUnavailable(ClassifierError, RuntimeError):
    STATUS_CODE = 503


class TorchUnavailable(ModelUnavailable):
    STATUS_CODE = 503


class ConfigurationError(ClassifierError, RuntimeError):
    STATUS_CODE = 503


class ObjectUnavailable(ClassifierError, LookupError):
    """S3's final word on a bulk worker's input; only ever written into its result."""

    STATUS_CODE = 404


class InternalError(ClassifierError, RuntimeError):
    """A bug of ours, met while handling one input or loading the model.

    The traceback goes to the log with the request id, never to the client;
    in a batch the other inputs still get their answers.
    """

    STATUS_CODE = 500


def first_line(error: BaseException) -> str:
    """An exception's first line: enough to name the problem, never a traceback."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
