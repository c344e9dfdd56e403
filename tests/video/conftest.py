"""The video tests' set-up: tests/ on the path (fake_model), a session clip."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/fake_model.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # video_clips

from video_clips import write_clip  # noqa: E402


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "shapes.mp4")
