"""The file-system defaults of factory-built DAGs (:mod:`astra_provider.dag_defaults`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from astra_provider.dag_defaults import MissingDefaultError, default_data_root, default_training_table


def _touch_at(path: Path, mtime: float, directory: bool = False) -> None:
    if directory:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("teff,logg,fe_h\n")
    os.utime(path, (mtime, mtime))


def test_defaults_name_what_to_give_when_astra_home_has_no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path))
    monkeypatch.delenv("ASTRA_DATA_ROOT", raising=False)
    data = re.escape(str(tmp_path / "data"))
    with pytest.raises(MissingDefaultError, match=rf"{data} holds no survey .*give data_root"):
        default_data_root()
    with pytest.raises(MissingDefaultError, match=rf"no {data}/\*/training\.csv .*give training_table"):
        default_training_table()


def test_defaults_are_the_newest_survey_and_training_table(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path))
    monkeypatch.delenv("ASTRA_DATA_ROOT", raising=False)
    data = tmp_path / "data"
    _touch_at(data / "new" / "apogee" / "1.3" / "visit", 2_000_000_000, directory=True)
    _touch_at(data / "old" / "apogee" / "1.3" / "visit", 1_000_000_000, directory=True)
    _touch_at(data / "old" / "training.csv", 2_000_000_000)
    _touch_at(data / "new" / "training.csv", 1_000_000_000)
    assert default_data_root() == str(data / "new")
    assert default_training_table() == str(data / "old" / "training.csv")
    monkeypatch.setenv("ASTRA_DATA_ROOT", "/srv/sdss")
    assert default_data_root() == "/srv/sdss"
