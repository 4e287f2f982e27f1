"""Settings: the embedded default loads; a bad file names the key and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.errors import ConfigError
from dicomnode.settings import DEFAULT_CONFIG_PATH, load_settings


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "dicomnode.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def test_embedded_default_loads() -> None:
    settings = load_settings(DEFAULT_CONFIG_PATH)
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.port == 11112
    assert settings.database.url.startswith("sqlite:///")
    assert settings.storage.path.is_absolute()


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    settings = _load(tmp_path, "storage: {path: ./store}\ndatabase: {url: 'sqlite:///x/n.db'}\n")
    assert settings.storage.path == (tmp_path / "store").resolve()
    assert settings.database.url == f"sqlite:///{(tmp_path / 'x' / 'n.db').resolve()}"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("node: {port: 70000}\n", "node.port"),
        ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}\n", "node.ae_title"),
        ("node: {colour: blue}\n", "node.colour"),
        ("storage: {min_free_mb: -1}\n", "storage.min_free_mb"),
        ("callers: [{host: 10.0.0.1}]\n", "callers[0].ae_title"),
        ("completeness: {expected_laterality: [X]}\n", "completeness.expected_laterality[0]"),
        ("completeness: {quiet_seconds: soon}\n", "completeness.quiet_seconds"),
        ("destinations: {pacs: {ae_title: PACS, host: h}}\n", "destinations.pacs.port"),
        ("nodes: {}\n", "nodes"),
        ("results: {max_attempts: 0}\n", "results.max_attempts"),
        ("results: {retry_seconds: 0}\n", "results.retry_seconds"),
    ],
)
def test_bad_key_is_named(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    assert f"'{names}'" in str(error.value)
    assert str(tmp_path / "dicomnode.yaml") in str(error.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2"):
        _load(tmp_path, "node: {port: 1}\nstorage: [unclosed\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


def test_results_section_defaults_and_values(tmp_path: Path) -> None:
    default = _load(tmp_path, "node: {port: 11112}\n").results
    assert (default.max_attempts, default.retry_seconds) == (3, 60.0)
    chosen = _load(tmp_path, "results: {max_attempts: 5, retry_seconds: 0.5}\n").results
    assert (chosen.max_attempts, chosen.retry_seconds) == (5, 0.5)
