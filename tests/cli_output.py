"""What the tests read from a command's output."""

from __future__ import annotations


def one_error_line(capsys, command: str) -> str:
    """The single line a failed command printed on stderr, with nothing on stdout; its message."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    return lines[0][len(f"{command}: error: "):]
