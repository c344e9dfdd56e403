"""The serve tests' set-up: tests/ and tests/video on the path (fake_model, video_clips)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/fake_model.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "video"))  # video_clips
