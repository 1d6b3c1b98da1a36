"""The eval-command hook: the score is the last stdout line; every failure is one line naming the command."""

from __future__ import annotations

import shlex
import sys
import threading
import time

import pytest

from mergescope.checkpoints import MergescopeError
from mergescope.merge.eval_command import check_template, command_arguments
from mergescope.merge.evaluation import EvaluationCancelled, score_with_command

PY = shlex.quote(sys.executable)


def script(tmp_path, body: str, name: str = "evaluate.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return f"{PY} {shlex.quote(str(path))}"


def test_last_non_empty_line_is_the_score_and_the_folder_is_one_argument(tmp_path):
    # prints logs, then the length of its single argument plus the number of arguments, then blank lines
    command = script(tmp_path, "import sys\nprint('loading', sys.argv)\nprint('score:')\n"
                               "print(len(sys.argv[1]) + 1000 * (len(sys.argv) - 1))\nprint()\nprint('   ')\n")
    folder = tmp_path / "a folder with spaces & 'quotes'"
    assert score_with_command(f"{command} {{model}}", folder) == 1000 + len(str(folder))


def test_placeholder_inside_an_argument(tmp_path):
    command = script(tmp_path, "import sys\nprint(float(sys.argv[1].startswith('--model=/x y')) * 7.5)\n")
    assert score_with_command(f"{command} --model={{model}}", "/x y") == 7.5
    assert command_arguments("run --model={model} '{model}/sub'", "/a b") == ["run", "--model=/a b", "/a b/sub"]


def test_scientific_notation_and_negative_scores(tmp_path):
    command = script(tmp_path, "print('-2.5e-3')\n")
    assert score_with_command(f"{command} {{model}}", tmp_path) == -0.0025


@pytest.mark.parametrize("last, expected", [
    ("'accuracy: 0.9'", "last line 'accuracy: 0.9' is not a number"),
    ("'nan'", "the score 'nan' is not a finite number"),
    ("'inf'", "the score 'inf' is not a finite number"),
])
def test_last_line_not_a_number(tmp_path, last, expected):
    command = script(tmp_path, f"print(0.5)\nprint({last})\n")
    with pytest.raises(MergescopeError) as error:
        score_with_command(f"{command} {{model}}", tmp_path / "m")
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert str(tmp_path / "m") in message  # names the command as run


def test_no_output(tmp_path):
    command = script(tmp_path, "pass\n")
    with pytest.raises(MergescopeError, match="printed nothing"):
        score_with_command(f"{command} {{model}}", tmp_path)


def test_non_zero_exit_reports_status_and_last_stderr_line(tmp_path):
    command = script(tmp_path, "import sys\nprint(0.9)\nprint('first', file=sys.stderr)\n"
                               "print('CUDA out of memory', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(MergescopeError) as error:
        score_with_command(f"{command} {{model}}", tmp_path)
    message = str(error.value)
    assert "exited with status 3: CUDA out of memory" in message and "\n" not in message
    assert "evaluate.py" in message


def test_missing_placeholder_and_bad_templates():
    with pytest.raises(MergescopeError, match=r"has no \{model\}"):
        check_template("python eval.py --model")
    with pytest.raises(MergescopeError, match="empty"):
        check_template("   ")
    with pytest.raises(MergescopeError, match="cannot be split"):
        check_template("python 'eval.py {model}")
    with pytest.raises(MergescopeError, match=r"has no \{model\}"):
        score_with_command("echo 1", "/tmp")


def test_command_not_found():
    with pytest.raises(MergescopeError, match="cannot start"):
        score_with_command("no-such-command-mergescope {model}", "/tmp")


def test_timeout_kills_the_command(tmp_path):
    command = script(tmp_path, "import time\ntime.sleep(30)\nprint(1)\n")
    start = time.monotonic()
    with pytest.raises(MergescopeError, match=r"ran longer than 0.5 s"):
        score_with_command(f"{command} {{model}}", tmp_path, timeout=0.5)
    assert time.monotonic() - start < 5


def test_cancel_kills_the_command(tmp_path):
    command = script(tmp_path, "import time\ntime.sleep(30)\nprint(1)\n")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(EvaluationCancelled):
        score_with_command(f"{command} {{model}}", tmp_path, cancel=cancel)
    assert time.monotonic() - start < 5


def test_shell_when_asked_for(tmp_path):
    # pipes need an explicit shell; the folder arrives as $0, still one argument
    folder = tmp_path / "two words"
    command = "sh -c 'printf \"%s\\n\" \"$0\" | wc -c' {model}"
    assert score_with_command(command, folder) == len(str(folder)) + 1
