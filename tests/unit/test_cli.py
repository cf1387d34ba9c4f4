from pathlib import Path

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.unit


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield path + (name,)
        if hasattr(command, "commands"):
            yield from _commands(command, path + (name,))


@pytest.mark.parametrize("path", sorted(_commands(cli)), ids=" ".join)
def test_every_subcommand_explains_itself(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    docstring_line = result.output.split("\n\n")[1].strip()
    assert len(docstring_line) > 20, f"`plum {' '.join(path)} --help` says too little"


def test_a_user_mistake_is_one_line_without_a_stack_trace(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka:\n  events_partitions: -1\n")
    result = CliRunner().invoke(cli, ["--config", str(bad), "stack", "down"])
    assert result.exit_code == 2
    assert result.output.startswith("error: Invalid configuration: kafka.events_partitions")
    assert "Traceback" not in result.output


def test_pipeline_without_a_running_stack_says_what_to_do(tmp_path):
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "pipeline", "--until-caught-up"])
    assert result.exit_code == 4
    assert "run `plum stack up`" in result.output


def test_library_deprecation_notices_are_dropped_but_the_projects_own_warnings_are_shown():
    import warnings

    from ops.cli import quiet_library_deprecations
    from ops.config import PROJECT_ROOT

    library = str(Path(warnings.__file__))  # outside the project, like kafka-python or importlib
    ours = str(PROJECT_ROOT / "ingest" / "pipeline.py")
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # what Feast's import does for DeprecationWarning ("once")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        quiet_library_deprecations()
        warnings.warn_explicit("read_text is deprecated", DeprecationWarning, library, 1)
        warnings.warn_explicit("a library's runtime problem", RuntimeWarning, library, 2)
        warnings.warn_explicit("our own deprecation", DeprecationWarning, ours, 3)
    assert shown == ["a library's runtime problem", "our own deprecation"]
