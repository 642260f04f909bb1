"""Shared test fixtures.

Tests that need the real COCO captions and published vocabularies read them from the folder named
by ``VSL_DATA_DIR`` (``.ci/run`` points it at ``../shared/data``), and the published pipeline's outputs
on them (golden tokens) from ``fixtures/reference`` beside that folder; without it they are skipped
with the reason shown in pytest's summary.
"""
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
DATA_ENV = "VSL_DATA_DIR"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real-data folder (``coco_precomp/``, ``vocab/``), or skip with the reason."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real captions/vocabularies not available: set {DATA_ENV} to the shared data folder")
    path = Path(value)
    if not (path / "vocab").is_dir() or not (path / "coco_precomp").is_dir():
        pytest.skip(f"{DATA_ENV}={value} does not hold vocab/ and coco_precomp/")
    return path


@pytest.fixture(scope="session")
def shared_reference_dir(shared_data_dir) -> Path:
    """``fixtures/reference`` of the shared folder (beside the data folder), or skip with the reason."""
    path = shared_data_dir.parent / "fixtures" / "reference"
    if not path.is_dir():
        pytest.skip(f"{DATA_ENV}={shared_data_dir}: no golden fixtures folder {path}")
    return path
