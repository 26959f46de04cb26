"""The ``dsnot`` command: verify is the library's, run/bench/eval come from the harness's entry points."""

from importlib.metadata import EntryPoint, EntryPoints

import pytest

from dsnot_modifier import cli


def test_help_lists_the_harness_commands_and_verify(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "{bench,eval,run,verify}" in out and "not installed" not in out


def _without_harness(monkeypatch, entries=()):
    monkeypatch.setattr(cli, "entry_points", lambda group: EntryPoints(entries))


@pytest.mark.parametrize("command", ["run", "bench", "eval"])
def test_a_harness_command_without_the_harness_names_the_fix(command, monkeypatch, capsys):
    _without_harness(monkeypatch)
    assert cli.main([command, "--help"]) == 2
    err = capsys.readouterr().err
    assert f"dsnot {command}:" in err and "pip install -e harness" in err and "scripts/setup" in err


def test_help_without_the_harness_says_what_is_missing(monkeypatch, capsys):
    _without_harness(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "{verify}" in out and "run, bench, eval: the harness is not installed" in out and "pip install -e harness" in out


def test_verify_loads_no_other_package(monkeypatch, tmp_path, capsys):
    broken = EntryPoint("run", "no_such_module_here", cli.COMMANDS_GROUP)
    _without_harness(monkeypatch, [broken])
    assert cli.main(["verify", str(tmp_path / "missing")]) == 2  # the checkpoint, not the import
    assert "dsnot verify:" in capsys.readouterr().err
