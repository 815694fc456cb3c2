"""Fixtures shared by the test files."""

import sys

import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Local .txt files cut from two plays (train) and a third (validation)."""
    sys.path.insert(0, ROOT)
    import train

    plays = dict(train.shakespeare_texts())
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(plays["macbeth"][:60000] + plays["othello"][:60000])
    (d / "valid.txt").write_text(plays["hamlet"][:20000])
    return str(d / "train.txt"), str(d / "valid.txt")
