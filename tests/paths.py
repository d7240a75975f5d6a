"""Repository paths the tests use (tests never read outside the repository)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"
STORIES = EXAMPLES / "stories260K" / "stories260K.onnx"
