import click
import pytest

from edgekit.cli import cli_for_tests


def all_commands():
    group = cli_for_tests()
    commands = {}
    for name, command in group.commands.items():
        commands[name] = command
        if isinstance(command, click.Group):
            commands.update({f"{name} {sub}": c for sub, c in command.commands.items()})
    return group, commands


def test_every_command_has_help_ending_with_an_example(cli):
    group, commands = all_commands()
    assert {
        "convert",
        "validate",
        "keygen",
        "package",
        "inspect",
        "verify",
        "demo",
        "emulate",
        "fleet collect",
        "fleet status",
    } <= set(commands)
    for name, command in commands.items():
        result = cli(*name.split(), "--help")
        assert result.exit_code == 0, name
        assert "Example" in command.help and "edgekit " + name in command.help.split("Example")[-1], name


def test_every_option_has_help_text():
    _, commands = all_commands()
    for name, command in commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and "0.1.0" in result.stdout


def test_usage_errors_exit_2(cli):
    assert cli("convert").exit_code == 2
    assert cli("nonsense").exit_code == 2


@pytest.mark.parametrize("command", ["status", "drift", "alerts"])
def test_fleet_reads_refuse_a_missing_database_instead_of_making_an_empty_one(cli, tmp_path, command):
    db = tmp_path / "mistyped.db"
    result = cli("fleet", command, "--db", db)
    assert result.exit_code == 2
    assert "no fleet database here" in result.output and "--db" in result.output
    assert not db.exists()


@pytest.mark.parametrize("target, name", [("tflite", "model.onnx"), ("onnx", "model.tflite")])
def test_convert_refuses_an_output_name_of_the_other_format(cli, digits, tmp_path, target, name):
    result = cli("convert", digits.model, "--target", target, "-o", tmp_path / name)
    assert (
        result.exit_code == 2 and f"--target is {target}" in result.output and f"end it in .{target}" in result.output
    )
    assert not (tmp_path / name).exists()
