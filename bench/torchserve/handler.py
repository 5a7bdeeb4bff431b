"""TorchServe's side of ``make bench-peers``: the demo model behind a handler on ``BaseHandler``.

This file runs inside TorchServe's worker (build/peers/venv), never in our
service: ``bench/peers_torchserve.py`` packs it into the model archive.
TorchServe's built-in ``image_classifier`` assumes resize 256 with ImageNet
mean and std and needs captum, so this handler reads the preprocessing from
the demo archive's ``manifest.json`` instead, as our service does, and does
it the way a TorchServe user writes it with torchvision's
``Resize``/``CenterCrop``/``ToTensor``/``Normalize``: the whole JPEG decoded,
then one resize. torchvision is spelled out in Pillow and numpy here because
PyPI's torchvision does not import beside the CPU torch this venv has.

One inference thread, as our service runs (INFERENCE_THREADS=1); the worker
would otherwise take one per core. The answer has our response's shape,
``{"class": ..., "confidence": ...}``, so one client reads both servers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class DemoModelHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        super().initialize(context)
        model_dir = Path(context.system_properties["model_dir"])
        self.preprocessing = json.loads((model_dir / "manifest.json").read_text())["preprocessing"]
        self.classes = (model_dir / "classes.txt").read_text(encoding="utf-8").splitlines()

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        return torch.stack([self._to_input(row.get("data") or row.get("body")) for row in data])

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        confidences, indices = torch.softmax(data, dim=1).max(dim=1)
        return [
            {"class": self.classes[int(index)], "confidence": float(confidence)}
            for confidence, index in zip(confidences, indices, strict=True)
        ]

    def _to_input(self, jpeg: bytes) -> torch.Tensor:
        """torchvision's Resize(short side) / CenterCrop / ToTensor / Normalize on a PIL image."""
        settings = self.preprocessing
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        width, height = image.size
        short = settings["resize"]
        size = (
            (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        )
        resized = image.resize(size, Image.Resampling[settings["interpolation"].upper()])
        crop = settings["crop"]
        left, top = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
        pixels = np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(settings["mean"], np.float32)) / np.asarray(settings["std"], np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1))
