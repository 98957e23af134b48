from __future__ import annotations

import pytest

from imagegate.cli import main


def test_models_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert lines["sandbox-edit"] == "sandbox:sandbox-edit"
    assert lines["qwen-image-edit-2511"] == "fal:fal-ai/qwen-image-edit-2511, replicate:qwen/qwen-image-edit-2511"


def test_serve_requires_a_known_command() -> None:
    with pytest.raises(SystemExit):
        main(["nonsense"])
