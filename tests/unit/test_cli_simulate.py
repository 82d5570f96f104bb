"""``gpufleet simulate`` passes its options through to ``gpufleet.scaling.sim``."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from gpufleet.cli import app

runner = CliRunner()


def test_simulate_writes_the_report(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["simulate", "--only", "bursty", "--no-chart", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# gpufleet simulate")
    assert "clairvoyant" in result.output


def test_simulate_help_and_bad_option() -> None:
    shown = runner.invoke(app, ["simulate", "--help"])
    assert shown.exit_code == 0
    assert "--traces" in shown.output
    assert runner.invoke(app, ["simulate", "--no-such-option"]).exit_code == 2
