"""Model archives built in memory, good and deliberately bad."""

from __future__ import annotations

import io
import tarfile

import torch
from PIL import Image

# Three outputs that are simply the mean of each normalised channel: a red
# image scores highest on "red", and so on. Small enough to build in a test,
# real enough to go through TorchScript save, load and a forward pass.
COLOUR_CLASSES = ("red", "green", "blue")


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 10.0


def traced_colour_model() -> bytes:
    """A traced model saved the way the fast.ai tutorial saves ``resnet50_jit.pth``."""
    traced = torch.jit.trace(MeanColour().eval(), torch.ones(1, 3, 224, 224))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def tar_gz(files: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def fastai_archive(classes: tuple[str, ...] = COLOUR_CLASSES) -> bytes:
    """The tutorial's layout: ``resnet50_jit.pth`` and ``classes.txt``, no manifest."""
    return tar_gz(
        {
            "./resnet50_jit.pth": traced_colour_model(),
            "./classes.txt": "\n".join(classes).encode(),
        }
    )


def solid_png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    """A one-colour PNG: what the colour model above was built to recognise."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()
