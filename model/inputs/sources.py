"""What a batch carries of its clips (`model.inputs.SOURCES`), made network input."""

from __future__ import annotations

from torch import Tensor

from model.backbone import normalize_frames
from model.inputs.flow import normalize_flow

_NORMALIZE = {"frames": normalize_frames, "optical_flow": normalize_flow}


def normalize_sources(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """uint8 sources as the pipeline yields them (``frames`` ``[B, T, S, S, 3]``,
    ``optical_flow`` ``[B, T, S, S, 2L]``) -> float ``[B, T, C, S, S]`` each; other keys
    (cached maps) pass unchanged."""
    return {key: _NORMALIZE[key](value) if key in _NORMALIZE else value
            for key, value in raw.items()}
