"""The demo model builder's key map, checked against the DEVELOPERS.md table."""

from __future__ import annotations

import pytest

from tools.build_demo_model import rename_key


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_mean", "bn1.running_mean"),
        ("_fc.bias", "classifier.bias"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.2._bn2.weight", "blocks.1.1.bn3.weight"),
        ("_blocks.3._project_conv.weight", "blocks.2.0.conv_pwl.weight"),
        ("_blocks.15._bn1.bias", "blocks.6.0.bn2.bias"),
    ],
)
def test_rename_key(source: str, target: str) -> None:
    assert rename_key(source) == target
