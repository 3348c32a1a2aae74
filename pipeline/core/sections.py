"""The base of every params section: strict keys and types. A leaf module, so that a module
defining its own options (``labelme.LabelmeParams``) needs no import of ``config``.

Strict types: a number must be written as one (``epochs: 10``, not ``epochs: "10"``) and a switch as
``true``/``false`` (not ``1`` or ``"true"``), so that what params.yaml says is what runs. A whole
number is still a valid value for a number with a fraction (``lr: 1``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

SEED = Field(0, ge=0, le=2**32 - 1)  # the per-epoch generator seeds derived from it must fit in 64 bits


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        # YAML reads yes/no/on/off as booleans, and pydantic would silently take them as 1 and 0.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation is not bool:
            raise ValueError("expected a number or text, not a boolean (YAML reads yes/no/on/off/true/false as one)")
        return value
