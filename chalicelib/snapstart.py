"""Lambda SnapStart: the model loaded and warmed before the snapshot, per-copy state renewed after restore.

With SnapStart (the ``onnx`` stage packaged with
``.chalice/merge-template-snapstart.json``; README: SnapStart), Lambda runs
init once, when a version is published, snapshots the sandbox's memory and
/tmp, and starts every new sandbox of that version by restoring the snapshot
instead of running init again. Lambda's python3.12+ runtimes carry
``snapshot_restore_py``: its before-snapshot hooks run once, after init, in
reverse order of registration; its after-restore hooks run in every restored
copy, in order of registration, before its first request.

- Before the snapshot, ``load_and_warm`` loads the model through the service
  (download, verification, ONNX Runtime's session) and sends one built-in
  image down the whole request path (decoding, preprocessing, a forward pass),
  so that the imports, the model and the first-run allocations are all in the
  snapshot and a restored copy's first request pays for nothing but itself.
  It needs no network beyond the model's S3 object: the image is made in memory.
- After each restore, ``renew_after_restore`` re-creates what every copy
  would otherwise share with all the others, since all start from the same
  memory:

  - the pooled S3 connections (``chalicelib.s3``): their sockets belonged to
    the sandbox the snapshot was taken in, and two copies must never talk
    over one connection;
  - the ``random`` module's generator, and numpy's global one: each is seeded
    once per process, so every copy would draw the same numbers (nothing of
    ours draws from them; libraries may);
  - the clock of ``MODEL_REFRESH_SECONDS``: the snapshot may have been cached
    for longer than the interval, so the first request checks for a newer
    model.

  Only a module already loaded can hold such state, so none is imported
  there: an import would put its cost on every restore's first request.
  Nothing else of ours outlives a request: the image fetcher opens a
  connection per hop, batch thread pools live for one request, request ids
  come from Lambda, and the S3 reader takes its credentials anew for every
  load or refresh.

``register_hooks`` only registers, and this module imports nothing heavy at
import, so importing the app stays as cheap as ``chalicelib.current`` keeps
it and does no I/O. Outside Lambda's runtime (development, tests, the
python3.11 torch simulation) there is no ``snapshot_restore_py`` and it does
nothing; on Lambda without SnapStart the hooks are registered and never called.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import time

from chalicelib import observability
from chalicelib.current import get_holder, get_service
from chalicelib.errors import ClassifierError
from chalicelib.payload import ImageInput, Invocation

logger = logging.getLogger(__name__)

# Larger than the default resize (256), so the warm-up image is scaled down as
# a photo would be, and small enough to cost a few milliseconds.
WARM_UP_SIZE = (320, 240)


def register_hooks() -> None:
    """Hand the two hooks to Lambda's runtime; without one (anywhere but Lambda), do nothing."""
    try:
        import snapshot_restore_py  # noqa: PLC0415 - only Lambda's python3.12+ runtimes have it
    except ModuleNotFoundError:
        return
    snapshot_restore_py.register_before_snapshot(load_and_warm)
    snapshot_restore_py.register_after_restore(renew_after_restore)


def load_and_warm() -> None:
    """Load the model and classify one built-in image, so that both are in the snapshot.

    A model that cannot be loaded now (not published yet, no permission, a
    setting wrong) does not stop the version from being published: the
    snapshot is taken without it, and each restored copy loads it on its
    first request, which reports the failure as an ordinary cold start would.
    """
    started = time.perf_counter()
    try:
        service = get_service()
        observability.configure_logging(service.settings.log_level)
        model = service.models.model()
        service.classify(Invocation(inputs=(warm_up_input(),), batch=False, top_k=None))
    except ClassifierError as error:
        logger.warning(
            "the snapshot is taken without the model, which the first request will load: %s", error
        )
        return
    warm_up_ms = round((time.perf_counter() - started) * 1000, 1)
    logger.info(
        "model loaded and warmed before the snapshot",
        extra={"model_version": model.files.version, "warm_up_ms": warm_up_ms},
    )


def renew_after_restore() -> None:
    """Give this restored copy connections and random generators of its own, and check the model soon."""
    s3 = sys.modules.get("chalicelib.s3")  # loaded by the model's download
    if s3 is not None:
        s3.forget_connections()
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    with contextlib.suppress(ClassifierError):  # a broken configuration: the first request reports it
        get_holder().check_on_next_request()


def warm_up_input() -> ImageInput:
    """A JPEG made in memory: the request path's common case, with no network and no file."""
    from PIL import Image  # noqa: PLC0415 - Pillow comes with the service, on first use

    gradient = Image.linear_gradient("L").resize(WARM_UP_SIZE)
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return ImageInput(data=buffer.getvalue(), source="The SnapStart warm-up image")
