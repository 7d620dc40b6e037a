"""``DecodeOptions``: how a caption is searched for (beam size, length limits, repetition controls; their
meaning is in ``captioning.decoding``). Torch-free, so the config schema derives the ``decoding`` section of
a profile YAML from these very fields (``config_schema.DecodingConfig``) instead of repeating them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1
    max_length: int = 20
    min_length: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    max_repeat_run: int = 0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}")
        if self.no_repeat_ngram_size < 0 or self.max_repeat_run < 0:
            raise ValueError("no_repeat_ngram_size and max_repeat_run must be >= 0")
        if self.repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, **overrides: Any) -> DecodeOptions:
        """Options from a config section (unknown keys are an error), then non-None ``overrides``."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown decoding option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
