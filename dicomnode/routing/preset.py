"""The preset schema (`presets/*.yaml`): a one-click model combination for an audience.

Routing conditions are data: exact values and regular expressions compiled with `re`;
nothing in a preset is ever evaluated as code. Checks that need the registry or the settings
(models exist, destinations defined) are in `loader.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from dicomnode.registry.manifest import MODEL_ID_PATTERN
from dicomnode.registry.version import LATEST, is_valid_version
from dicomnode.routing.tags import normalise_tag

PRESET_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> Any:
    """A single value is a list of one: `modality: OP` == `modality: [OP]`."""
    if value is None:
        return []
    if isinstance(value, str | int | float):
        return [str(value)]
    return value


Values = Annotated[list[str], BeforeValidator(_as_list)]


class OutputOptions(_Strict):
    sr: bool = True
    seg: bool = True
    overlay: bool = False


class CompletenessRule(_Strict):
    """Overrides the node's completeness settings for studies routed here; unset = node's."""

    expected_laterality: list[Literal["L", "R"]] | None = None
    quiet_seconds: Annotated[float, Field(ge=0)] | None = None


class TagCondition(_Strict):
    """Holds when some instance's value of `tag` matches `regex` (re.search semantics)."""

    tag: str
    regex: str
    ignore_case: bool = False

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        normalise_tag(value)  # raises ValueError with the reason
        return value

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @property
    def tag_key(self) -> str:
        return normalise_tag(self.tag)

    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex, re.IGNORECASE if self.ignore_case else 0)


class RoutingConditions(_Strict):
    """All given conditions must hold. Each lists accepted values; one matching value holds.

    Values compare after trimming spaces, ignoring case (DICOM pads and cameras vary in case).
    """

    modality: Values = Field(default_factory=list)
    calling_ae: Values = Field(default_factory=list)
    called_ae: Values = Field(default_factory=list)
    station_name: Values = Field(default_factory=list)
    institution: Values = Field(default_factory=list)
    manufacturer: Values = Field(default_factory=list)
    manufacturer_model: Values = Field(default_factory=list)
    body_part: Values = Field(default_factory=list)
    laterality: Values = Field(default_factory=list)
    tags: list[TagCondition] = Field(default_factory=list)

    @field_validator("laterality")
    @classmethod
    def _laterality(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v.strip().upper() not in ("L", "R", "B", "U")]
        if bad:
            raise ValueError(f"laterality is L, R, B or U, not {bad}")
        return [v.strip().upper() for v in value]

    @field_validator("modality")
    @classmethod
    def _modality(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value]

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in type(self).model_fields)


def _check_ref(ref: str) -> str:
    model_id, sep, version = ref.strip().partition("@")
    if not MODEL_ID_PATTERN.match(model_id):
        raise ValueError(f"'{ref}' is not a model id (lower-case letters, digits, hyphens)")
    if sep and not (version == LATEST or is_valid_version(version)):
        raise ValueError(f"'{ref}': '{version}' is not a version such as 1.0.0 (or 'latest')")
    return ref.strip()


class Preset(_Strict):
    id: str
    name: str
    audience: str
    description: str
    models: list[str] = Field(min_length=1)  # 'id' (latest) or 'id@version'
    # Offered in the console as switches that are off by default; not run unless switched on.
    optional_models: list[str] = Field(default_factory=list)
    outputs: OutputOptions = Field(default_factory=OutputOptions)
    destinations: list[str] = Field(default_factory=list)
    completeness: CompletenessRule = Field(default_factory=CompletenessRule)
    routing: RoutingConditions = Field(default_factory=RoutingConditions)
    priority: int = 0
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not PRESET_ID_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not a preset id: lower-case letters, digits and hyphens"
            )
        return value

    @field_validator("name", "audience", "description")
    @classmethod
    def _filled(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("models", "optional_models")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        refs = [_check_ref(v) for v in value]
        ids = [r.partition("@")[0] for r in refs]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"models listed twice: {dupes}")
        return refs

    @property
    def model_ids(self) -> list[str]:
        return [r.partition("@")[0] for r in self.models]

    @property
    def optional_ids(self) -> list[str]:
        return [r.partition("@")[0] for r in self.optional_models]
