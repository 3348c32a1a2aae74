"""The base of every params section: strict keys, no booleans for numbers. A leaf module, so that
a module defining its own options (``labelme.LabelmeParams``) needs no import of ``config``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

SEED = Field(0, ge=0, le=2**32 - 1)  # the per-epoch generator seeds derived from it must fit in 64 bits


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        # YAML reads yes/no/on/off as booleans, and pydantic would silently take them as 1 and 0.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("expected a number or text, not a boolean (YAML reads yes/no/on/off/true/false as one)")
        return value
