"""The one configuration object that travels from node widgets to checkpoint metadata and back."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# bits name -> (weight bits, activation bits); activation bits 16 means weight-only.
BIT_SCHEMES: dict[str, tuple[int, int]] = {
    "w4a8": (4, 8),
    "w6a6": (6, 6),
    "w8a8": (8, 8),
}
WEIGHT_ONLY_SCHEME = "w4a16"  # modulation and text-refiner Linears: one vector / few tokens per sample
GROUP_SIZES = (0, 128)  # 0 = one scale per output channel
HADAMARD_BLOCK = 128


def is_int(x: Any) -> bool:
    """An integer from JSON or a widget (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float (a bool is not one)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed integer code of ``bits`` bits (e.g. 4 -> 7)."""
    return (1 << (bits - 1)) - 1


class JsonConfig:
    """to_dict / from_dict for the frozen dataclasses stored in checkpoint metadata (configs, a family's
    dimensions): missing fields take their defaults, a missing field without one and an unknown field are
    ValueErrors naming the fields (a damaged file gets a message, never a TypeError)."""

    LABEL = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.LABEL} metadata must be a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.LABEL} fields {unknown}; known fields are {sorted(known)}")
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.LABEL} metadata lacks the fields {missing}")
        return cls(**dict(data))


@dataclass(frozen=True)
class QuantSparseConfig(JsonConfig):
    """How a model is quantized.

    ``bits`` names the scheme of the attention and MLP Linears of the transformer blocks;
    ``group_size`` 0 keeps one weight scale per output channel, 128 one per 128 inputs;
    ``weight_only_bits`` is used for the Linears that see one vector per sample (modulation)
    or only text tokens (the text refiner), where activation quantization buys no speed.
    """

    bits: str = "w4a8"
    group_size: int = 0
    rotate: bool = True
    weight_only_bits: int = 4

    LABEL = "quantization config"

    def __post_init__(self) -> None:
        if self.bits not in BIT_SCHEMES:
            raise ValueError(
                f"QuantSparseConfig.bits={self.bits!r} is not supported; choose one of {sorted(BIT_SCHEMES)}"
            )
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"QuantSparseConfig.group_size={self.group_size} is not supported; use 0 (per output channel) or 128"
            )
        if self.group_size and self.weight_bits != 4:
            raise ValueError("group_size=128 is only implemented for 4-bit weights (bits='w4a8'); use group_size=0")
        if self.weight_only_bits != 4:
            raise ValueError("weight_only_bits must be 4 (the weight-only kernel is INT4)")
        if not isinstance(self.rotate, bool):
            raise ValueError("QuantSparseConfig.rotate must be a bool")

    @property
    def weight_bits(self) -> int:
        return BIT_SCHEMES[self.bits][0]

    @property
    def act_bits(self) -> int:
        return BIT_SCHEMES[self.bits][1]



def kind_group_size(kind: str, config: QuantSparseConfig) -> int:
    """Group size of a layer of ``kind``: the configured one for 4-bit weights, per channel otherwise."""
    return config.group_size if kind in ("w4a8", WEIGHT_ONLY_SCHEME) else 0


def kind_rotate(kind: str, config: QuantSparseConfig) -> bool:
    """Whether a layer of ``kind`` is stored rotated (the weight-only layers keep their inputs as they are)."""
    return config.rotate and kind != WEIGHT_ONLY_SCHEME
