"""The model manifest schema (`model_registry/<id>/<version>/manifest.yaml`).

Validated with pydantic, unknown keys refused, so a typo is an error instead of a silently
ignored setting. Checks that need other models (references) or the ONNX file live in
`checks.py`; this module only says what one manifest may contain.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

from dicomnode.registry.version import LATEST, is_valid_version

# Lower-case words joined by hyphens: no dots or '@', so "id.output" and "id@version" parse.
MODEL_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
OUTPUT_REF_PATTERN = re.compile(r"^(?P<model>[a-z0-9][a-z0-9-]{0,63})\.(?P<output>[^\s]+)$")

Task = Literal["classification", "segmentation", "measurement", "detection"]
DType = Literal["float32", "float16", "float64", "uint8", "int64", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _non_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be blank")
    return value.strip()


class Code(_Strict):
    """A coded concept as DICOM writes it: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str
    scheme_version: str | None = None

    @field_validator("scheme", "value", "meaning")
    @classmethod
    def _filled(cls, value: str) -> str:
        return _non_blank(value, "a code's scheme, value and meaning")

    @field_validator("scheme")
    @classmethod
    def _designator(cls, value: str) -> str:
        # A Coding Scheme Designator is a short string (SH): 16 characters, no backslash.
        if len(value) > 16 or "\\" in value:
            raise ValueError("a coding scheme designator is at most 16 characters, no backslash")
        return value

    @field_validator("value")
    @classmethod
    def _value_length(cls, value: str) -> str:
        if "\\" in value or len(value) > 64:
            raise ValueError("a code value is at most 64 characters, no backslash")
        return value


class UcumUnit(_Strict):
    """A unit of measurement as a UCUM code, e.g. {code: mm2, meaning: square millimeter}."""

    code: str
    meaning: str

    @field_validator("code", "meaning")
    @classmethod
    def _filled(cls, value: str) -> str:
        return _non_blank(value, "a UCUM unit's code and meaning")

    @field_validator("code")
    @classmethod
    def _no_space(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("a UCUM code has no spaces (e.g. 'mm2', '1', '%', 'deg')")
        return value


class ImageRequirements(_Strict):
    """What the source image must offer; images that do not are skipped with that reason."""

    colour: Literal["colour", "monochrome", "any"] = "any"
    min_width: Annotated[int, Field(ge=0)] = 0
    min_height: Annotated[int, Field(ge=0)] = 0


class Normalisation(_Strict):
    """x' = (x * scale - mean[c]) / std[c], per channel, on pixel values 0..255."""

    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("std")
    @classmethod
    def _no_zero(cls, value: list[float]) -> list[float]:
        if any(v == 0 for v in value):
            raise ValueError("a standard deviation of 0 would divide by zero")
        return value


class TensorInput(_Strict):
    """An image tensor the executor prepares from the source image."""

    name: str  # the ONNX graph input name
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]  # [height, width]
    colour: Literal["RGB", "BGR", "green", "grey"] = "RGB"
    normalisation: Normalisation = Field(default_factory=Normalisation)
    dtype: DType = "float32"
    # "dynamic": any batch size (images are batched); an int: exactly that many per run.
    batch: Literal["dynamic"] | Annotated[int, Field(ge=1)] = "dynamic"
    # Crop to the fundus field of view before resizing (cameras frame it differently).
    crop_fov: bool = True

    @property
    def channels(self) -> int:
        return 3 if self.colour in ("RGB", "BGR") else 1

    @model_validator(mode="after")
    def _normalisation_channels(self) -> TensorInput:
        for label, values in (("mean", self.normalisation.mean), ("std", self.normalisation.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"normalisation.{label} has {len(values)} values; colour {self.colour} "
                    f"needs 1 or {self.channels}"
                )
        return self


class OutputRef(_Strict):
    model: str
    output: str

    def __str__(self) -> str:
        return f"{self.model}.{self.output}"

    @model_serializer
    def _as_text(self) -> str:
        # Written back as the manifest spells it, so dumps validate again unchanged.
        return str(self)


def _parse_output_ref(text: Any) -> OutputRef:
    if not isinstance(text, str):
        raise ValueError("a 'from' reference is a string '<model-id>.<output-name>'")
    match = OUTPUT_REF_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(
            f"'{text}' is not '<model-id>.<output-name>' (e.g. vessel-seg.vessel_mask)"
        )
    return OutputRef(model=match.group("model"), output=match.group("output"))


class UpstreamInput(_Strict):
    """An input fed from another model's output; this is what orders the graph.

    `from` is one reference or a list of alternatives: the first whose model is in the graph
    feeds the input; when none is, the resolver adds the first one.
    """

    name: str  # the ONNX graph input name
    sources: tuple[OutputRef, ...] = Field(alias="from", min_length=1)
    dtype: DType = "float32"
    # True: the source mask thresholded at the source's own threshold (1 / 0), not its
    # probability; a consumer then agrees with what the source reports, whichever model feeds it.
    binarise: bool = False
    # Source model id -> the version whose outputs this model was fitted on (learned heads
    # read raw maps: another version's maps would give wrong answers without any error).
    fitted_on: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fitted_on_names_a_source(self) -> UpstreamInput:
        named = {r.model for r in self.sources}
        for model in self.fitted_on:
            if model not in named:
                raise ValueError(
                    f"fitted_on names '{model}', which is not one of this input's 'from' "
                    f"models ({', '.join(sorted(named))})"
                )
        return self

    @field_validator("sources", mode="before")
    @classmethod
    def _parse_sources(cls, value: Any) -> tuple[OutputRef, ...]:
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError("'from' needs at least one '<model-id>.<output-name>'")
        refs = tuple(
            item if isinstance(item, OutputRef) else _parse_output_ref(item) for item in items
        )
        if len({r.model for r in refs}) != len(refs):
            raise ValueError("'from' alternatives must name different models")
        return refs


def _input_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "upstream" if "from" in value else "tensor"
    return "upstream" if isinstance(value, UpstreamInput) else "tensor"


InputSpec = Annotated[
    Annotated[TensorInput, Tag("tensor")] | Annotated[UpstreamInput, Tag("upstream")],
    Discriminator(_input_kind),
]


class ClassLabel(_Strict):
    label: str
    code: Code


class GateReason(_Strict):
    """What one ineligible class says about an image it stops: text, and optionally a code."""

    text: str
    code: Code | None = None  # unset: the class's own code

    @field_validator("text")
    @classmethod
    def _filled(cls, value: str) -> str:
        return _non_blank(value, "a gate reason's text")


class Gate(_Strict):
    """Marks images ineligible for the models that depend on this one (e.g. ungradable).

    `reason` is the text for every ineligible class; `reasons` gives one class its own text
    and code (e.g. "not a fundus photograph" beside "ungradable image").
    """

    ineligible: list[str] = Field(min_length=1)  # class labels that stop the image
    reason: str = "ineligible"
    reasons: dict[str, GateReason] = Field(default_factory=dict)

    @field_validator("reason")
    @classmethod
    def _reason_filled(cls, value: str) -> str:
        return _non_blank(value, "gate.reason")

    @model_validator(mode="after")
    def _reasons_for_ineligible(self) -> Gate:
        dupes = sorted({g for g in self.ineligible if self.ineligible.count(g) > 1})
        if dupes:
            raise ValueError(f"gate.ineligible lists {dupes} more than once")
        extra = [label for label in self.reasons if label not in self.ineligible]
        if extra:
            raise ValueError(
                f"gate.reasons names {extra}, not in gate.ineligible {self.ineligible}; "
                "a reason is only for a class that stops the image"
            )
        return self

    def text_for(self, label: str) -> str:
        found = self.reasons.get(label)
        return found.text if found is not None else self.reason


class ProbabilitiesOutput(_Strict):
    """Class probabilities, shape [N, classes]."""

    kind: Literal["probabilities"]
    name: str
    concept: Code | None = None  # what is being classified (the SR's question)
    classes: list[ClassLabel] = Field(min_length=2)
    # With a threshold, `positive` is predicted when its probability reaches it; otherwise the
    # most probable of the other classes. Without one, the most probable class.
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    positive: str | None = None
    gate: Gate | None = None
    # Feeds the study summary of the report: "worst" means `classes` are listed from best to
    # worst, and the study reports the worst class its analysed images got (e.g. the DR grade
    # of the worse eye, or "referable" when any image is).
    summary: Literal["worst"] | None = None

    @model_validator(mode="after")
    def _labels(self) -> ProbabilitiesOutput:
        labels = [c.label for c in self.classes]
        if len(set(labels)) != len(labels):
            raise ValueError("class labels must be unique")
        if self.positive is not None and self.positive not in labels:
            raise ValueError(f"positive class '{self.positive}' is not one of {labels}")
        if self.threshold is not None and self.positive is None and len(labels) != 2:
            raise ValueError("a threshold over more than two classes needs 'positive'")
        if self.gate is not None:
            unknown = [g for g in self.gate.ineligible if g not in labels]
            if unknown:
                raise ValueError(f"gate names unknown class labels {unknown}; classes are {labels}")
        if self.summary is not None:
            self._check_summary()
        return self

    def _check_summary(self) -> None:
        if self.gate is not None:
            raise ValueError(
                f"output '{self.name}': a gate cannot feed the study summary ('summary'); the "
                "images it stops are listed there as not analysed")
        if self.concept is None:
            raise ValueError(
                f"output '{self.name}': 'summary' needs a 'concept' (what the summary line "
                "reports, e.g. Diabetic retinopathy)")
        codes = [(c.code.scheme, c.code.value) for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(
                f"output '{self.name}': 'summary: worst' orders the classes by their codes, so "
                "each class needs a different code")

    @property
    def positive_label(self) -> str:
        return self.positive if self.positive is not None else self.classes[-1].label


class Segment(_Strict):
    label: str
    category: Code
    type: Code
    description: str | None = None


class MaskOutput(_Strict):
    """A probability (or binary) mask, shape [N, 1, H, W] or [N, H, W]."""

    kind: Literal["mask"]
    name: str
    segment: Segment
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


PixelMeasure = Literal["length", "area"]

# The units the node reports a `pixel_measure` in (UCUM annotations for pixels).
PIXEL_UNITS: dict[str, UcumUnit] = {
    "length": UcumUnit(code="{px}", meaning="pixels of the source image"),
    "area": UcumUnit(code="{px2}", meaning="square pixels of the source image"),
}
PHYSICAL_UNITS: dict[str, UcumUnit] = {
    "length": UcumUnit(code="mm", meaning="millimeter"),
    "area": UcumUnit(code="mm2", meaning="square millimeter"),
}


class MeasurementOutput(_Strict):
    """One number per image, shape [N] or [N, 1].

    Either `unit` (the value is reported as it is) or `pixel_measure`: the value is a length or
    an area in pixels of the model's input grid, which the node rescales to pixels of the source
    image and, where the image has Pixel Spacing, to mm / mm2 (a model never sees the spacing).
    """

    kind: Literal["measurement"]
    name: str
    code: Code
    unit: UcumUnit | None = None
    pixel_measure: PixelMeasure | None = None

    @model_validator(mode="after")
    def _one_unit(self) -> MeasurementOutput:
        if self.pixel_measure is not None and self.unit is not None:
            raise ValueError(
                f"output '{self.name}': leave 'unit' out with 'pixel_measure' (the node reports "
                "pixels of the source image, and mm where Pixel Spacing is known)"
            )
        if self.pixel_measure is None and self.unit is None:
            raise ValueError(
                f"output '{self.name}' needs a 'unit' (or 'pixel_measure: length' / 'area' for a "
                "size in pixels of the model's input)"
            )
        return self

    @property
    def reported_unit(self) -> UcumUnit:
        """The unit of the value the node reports first (source pixels for a pixel measure)."""
        if self.pixel_measure is not None:
            return PIXEL_UNITS[self.pixel_measure]
        assert self.unit is not None  # the validator guarantees one of the two
        return self.unit


class PointOutput(_Strict):
    """A location per image, shape [N, 2] as (x, y)."""

    kind: Literal["point"]
    name: str
    code: Code
    coordinates: Literal["pixels", "normalised"] = "normalised"


class BoxOutput(_Strict):
    """A box per image, shape [N, 4] as (x0, y0, x1, y1)."""

    kind: Literal["box"]
    name: str
    code: Code
    coordinates: Literal["pixels", "normalised"] = "normalised"


AnyOutput = ProbabilitiesOutput | MaskOutput | MeasurementOutput | PointOutput | BoxOutput
OutputSpec = Annotated[AnyOutput, Field(discriminator="kind")]


class Provenance(_Strict):
    authors: list[str] = Field(min_length=1)
    training_data: str
    licence: str
    intended_use: str
    not_intended_for: str | None = None
    card: str | None = "CARD.md"  # relative to the manifest's folder

    @field_validator("training_data", "licence", "intended_use")
    @classmethod
    def _filled(cls, value: str) -> str:
        return _non_blank(value, "training_data, licence and intended_use")


class MetricRecord(_Strict):
    dataset: str
    split: str
    date: str  # ISO date of the measurement
    # A figure is a number; `<name>_ci: [low, high]` is the confidence interval of `<name>`.
    figures: dict[str, float | list[float]]
    dataset_sha256: str | None = None
    notes: str | None = None

    @field_validator("figures")
    @classmethod
    def _intervals(cls, value: dict[str, float | list[float]]) -> dict[str, float | list[float]]:
        for name, figure in value.items():
            if isinstance(figure, list) and not (
                    name.endswith("_ci") and len(figure) == 2 and figure[0] <= figure[1]):
                raise ValueError(f"figure '{name}': only a '<name>_ci' figure is a list, "
                                 "[low, high] with low <= high")
        return value


class Manifest(_Strict):
    id: str
    version: str
    name: str
    description: str | None = None
    task: Task
    modalities: list[str] = Field(min_length=1)
    requirements: ImageRequirements = Field(default_factory=ImageRequirements)
    file: str = "model.onnx"  # relative to the manifest's folder
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    requires: list[str] = Field(default_factory=list)
    conflicts: list[str] = Field(default_factory=list)
    provenance: Provenance
    metrics: list[MetricRecord] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not MODEL_ID_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not a model id: lower-case letters, digits and hyphens, "
                "starting with a letter or digit, at most 64 characters"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str:
        text = str(value) if isinstance(value, int | float) else value
        if not isinstance(text, str) or not is_valid_version(text):
            reserved = " ('latest' is reserved)" if text == LATEST else ""
            raise ValueError(f"'{value}' is not a version such as 1.0.0{reserved}")
        return text

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        cleaned = [m.strip().upper() for m in value]
        bad = [m for m in cleaned if not re.fullmatch(r"[A-Z0-9_]{1,16}", m)]
        if bad:
            raise ValueError(f"not DICOM modality codes: {bad}")
        return cleaned

    @field_validator("requires", "conflicts")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not MODEL_ID_PATTERN.match(v)]
        if bad:
            raise ValueError(f"not model ids (a version cannot be named here): {bad}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for label, names in (
            ("input", [i.name for i in self.inputs]),
            ("output", [o.name for o in self.outputs]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{label} names must be unique: {dupes}")
        if self.id in self.requires or self.id in self.conflicts:
            raise ValueError("a model cannot require or conflict with itself")
        both = sorted(set(self.requires) & set(self.conflicts))
        if both:
            raise ValueError(f"{both} both required and in conflict")
        for spec in self.upstream_inputs:
            if any(ref.model == self.id for ref in spec.sources):
                raise ValueError(f"input '{spec.name}' takes its own output")
        return self

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def tensor_inputs(self) -> list[TensorInput]:
        return [i for i in self.inputs if isinstance(i, TensorInput)]

    @property
    def upstream_inputs(self) -> list[UpstreamInput]:
        return [i for i in self.inputs if isinstance(i, UpstreamInput)]

    def output(self, name: str) -> AnyOutput | None:
        return next((o for o in self.outputs if o.name == name), None)

    @property
    def gates(self) -> list[ProbabilitiesOutput]:
        return [o for o in self.outputs if isinstance(o, ProbabilitiesOutput) and o.gate]

    def dependency_ids(self) -> set[str]:
        """Every model named by requires or as a possible `from:` source."""
        ids = set(self.requires)
        for spec in self.upstream_inputs:
            ids.update(ref.model for ref in spec.sources)
        return ids


def input_source_problem(spec: UpstreamInput, ref: OutputRef, source: Manifest) -> str | None:
    """Why `source` cannot feed `spec` through `ref`, or None when it can."""
    output = source.output(ref.output)
    if output is None:
        return (
            f"input '{spec.name}' takes {ref}, but {source.key} has no output "
            f"'{ref.output}' (outputs: {', '.join(o.name for o in source.outputs)})"
        )
    if spec.binarise and not isinstance(output, MaskOutput):
        return (
            f"input '{spec.name}' binarises {ref}, but that is a {output.kind} output; "
            "only a mask has a threshold"
        )
    return None


def input_version_problem(spec: UpstreamInput, ref: OutputRef, source: Manifest) -> str | None:
    """Why `source`'s version cannot feed `spec` (it was fitted on another), or None.

    Checked on a resolved graph, not when the registry loads: an older source version, pinned,
    can still feed a consumer fitted on it.
    """
    wanted = spec.fitted_on.get(ref.model)
    if wanted is None or wanted == source.version:
        return None
    return (
        f"input '{spec.name}' was fitted on {ref.model}@{wanted}'s output '{ref.output}', "
        f"but the graph has {source.key}"
    )

