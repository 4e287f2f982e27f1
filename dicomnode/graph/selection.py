"""What the user asked for: a preset's models, switched on/off, for a modality."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    """Model references are 'id' or 'id@version' (no version = the latest accepted one)."""

    models: tuple[str, ...] = ()
    with_models: tuple[str, ...] = ()  # switched on (the secondary selection)
    without: tuple[str, ...] = ()  # switched off: model ids, no version
    modality: str | None = None
    preset: str | None = None

    @classmethod
    def of(
        cls,
        models: Iterable[str] = (),
        *,
        with_models: Iterable[str] = (),
        without: Iterable[str] = (),
        modality: str | None = None,
        preset: str | None = None,
    ) -> Selection:
        return cls(
            tuple(models),
            tuple(with_models),
            tuple(without),
            modality.strip().upper() if modality else None,
            preset,
        )

    def plus(self, ref: str) -> Selection:
        """This selection with one more model switched on (and no longer switched off)."""
        model_id = ref.partition("@")[0]
        return Selection(
            self.models,
            (*self.with_models, ref),
            tuple(w for w in self.without if w != model_id),
            self.modality,
            self.preset,
        )
