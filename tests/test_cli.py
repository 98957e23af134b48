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


def test_serve_refuses_zero_workers_in_one_line() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "imagegate.cli", "serve", "--workers", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "imagegate: invalid setting 'workers' = '0' from --workers: must be at least 1"
    )
