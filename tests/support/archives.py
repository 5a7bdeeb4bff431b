"""Model archives built in memory, good and deliberately bad."""

from __future__ import annotations

import io
import tarfile

import onnx
import torch
from PIL import Image

from tools.onnx_export import export_torchscript

# Three outputs that are simply the mean of each normalised channel: a red
# image scores highest on "red", and so on. Small enough to build in a test,
# real enough to go through TorchScript save, load and a forward pass.
COLOUR_CLASSES = ("red", "green", "blue")


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 10.0


class NoisyColour(torch.nn.Module):
    """Random scores on top: a model that cannot agree with any export of itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 10.0 + torch.rand(x.shape[0], 3) * 5


class FourierColour(torch.nn.Module):
    """Uses an operator (``fft_rfft``) the TorchScript-based ONNX exporter does not support."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x.mean(dim=(2, 3)), n=4).abs()[:, :3]


class BranchyColour(torch.nn.Module):
    """Branches on the data: TorchScript keeps both branches, ``torch.export`` cannot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.mean() > 0):
            return x.mean(dim=(2, 3)) * 10.0
        return x.mean(dim=(2, 3)) * -10.0


class PairOfScores(torch.nn.Module):
    """Returns a tuple, not a tensor of scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), x.mean(dim=(2, 3))


class ScoresPerRow(torch.nn.Module):
    """Returns (batch, classes, rows): one dimension too many."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=3)


def scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def traced_colour_model() -> bytes:
    """A traced model saved the way the fast.ai tutorial saves ``resnet50_jit.pth``."""
    traced = torch.jit.trace(MeanColour().eval(), torch.ones(1, 3, 224, 224))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def onnx_colour_model(*, fixed_batch: bool = False) -> bytes:
    """The colour model exported as ``publish_model --onnx`` does; or with batch fixed at 1,
    as exporters leave it when not told the batch axis is dynamic."""
    exported = export_torchscript(traced_colour_model(), crop=224)
    if not fixed_batch:
        return exported
    model = onnx.load_from_string(exported)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model.SerializeToString()


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
