"""qmail-spp's plugins file (``control/smtpplugins``): which programs run at which command.

Entry points: :func:`load_spp_file` (read and check a file), :func:`parse_spp_file`
(the text alone), :class:`SppFile` and :class:`SppProgram`. The format is qmail-spp's
(seed 003, section 9):

* a section starts with a line ``[name]``; as in qmail-spp only the first letter of the
  name counts: ``c`` connection, ``h`` helo, ``m`` mail, ``r`` rcpt, ``d`` data, ``a``
  auth; programs under any other section (or before the first one) are ignored;
* one program per line; a line starting with ``:`` is run as ``/bin/sh -c REST``
  (arguments and shell syntax allowed), any other line is the path of a program run
  without arguments;
* lines starting with ``#`` and empty lines are skipped; trailing (and, unlike qmail's
  ``control_readfile``, leading) white space is removed;
* relative paths are taken from the plugins file's directory: a program path is made
  absolute against it, and every program runs with it as working directory (so
  ``:plugins/rbl -r zen.example`` finds ``plugins/rbl`` there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["SECTIONS", "SppFile", "SppProgram", "load_spp_file", "parse_spp_file"]

SECTIONS: tuple[str, ...] = ("connection", "helo", "mail", "rcpt", "data", "auth")
"""The sections qmail-spp (with its SMTP AUTH patch) knows, in session order."""

_BY_LETTER = {name[0]: name for name in SECTIONS}


@dataclass(frozen=True, slots=True)
class SppProgram:
    """One plugin line.

    Attributes:
        line: the line as written in the file (``":plugins/rbl -r zen.example"``); used
            in logs and, as qmail-spp does, in the ``451`` failure reply.
        argv: what is executed: ``("/abs/path/prog",)`` or ``("/bin/sh", "-c", "...")``.
        shell: True for a ``:`` line.
        lineno: the line number in the file (1-based).
    """

    line: str
    argv: tuple[str, ...]
    shell: bool
    lineno: int


@dataclass(frozen=True, slots=True)
class SppFile:
    """A parsed plugins file.

    Attributes:
        path: the absolute path it was read from (``""`` for text parsed directly).
        directory: where relative paths start, and the programs' working directory.
        sections: section name (see :data:`SECTIONS`) → programs, in file order; every
            section is present (possibly empty).
        ignored: ``(lineno, line)`` of programs under an unknown section or before the
            first section (qmail-spp ignores them too).
    """

    path: str
    directory: str
    sections: dict[str, tuple[SppProgram, ...]]
    ignored: tuple[tuple[int, str], ...] = field(default=())

    def programs(self, section: str) -> tuple[SppProgram, ...]:
        """The programs of ``section`` (empty when none)."""
        return self.sections.get(section, ())


def parse_spp_file(text: str, directory: str, path: str = "") -> SppFile:
    """Parse the text of a plugins file.

    Args:
        text: the file's content.
        directory: absolute directory relative program paths are resolved against.
        path: where the text came from (kept in :attr:`SppFile.path`).

    Returns:
        The parsed file. Parsing itself never fails: like qmail-spp, unknown sections
        are ignored (listed in :attr:`SppFile.ignored`).
    """
    lists: dict[str, list[SppProgram]] = {name: [] for name in SECTIONS}
    ignored: list[tuple[int, str]] = []
    current: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = _BY_LETTER.get(line[1:2].lower())
            continue
        if line.startswith(":"):
            program = SppProgram(line, ("/bin/sh", "-c", line[1:]), True, lineno)
        else:
            program = SppProgram(line, (os.path.join(directory, line),), False, lineno)
        if current is None:
            ignored.append((lineno, line))
        else:
            lists[current].append(program)
    return SppFile(path, directory, {k: tuple(v) for k, v in lists.items()}, tuple(ignored))


def load_spp_file(path: str) -> SppFile:
    """Read and parse the plugins file at ``path`` and check its programs.

    Args:
        path: the file (made absolute against the current directory if relative).

    Returns:
        The parsed file.

    Raises:
        OSError: the file cannot be read.
        ValueError: a program line (not a ``:`` line) names a file that does not exist
            or is not executable; the message names the line. (qmail-spp would find out
            at the first session and answer 451 there; smtpgate refuses the
            configuration instead.)
    """
    path = os.path.abspath(path)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    parsed = parse_spp_file(text, os.path.dirname(path), path)
    problems = []
    for section in SECTIONS:
        for program in parsed.programs(section):
            if program.shell:
                continue
            exe = program.argv[0]
            if not os.path.isfile(exe):
                problems.append(f"{path}:{program.lineno}: [{section}] {program.line}: "
                                f"no such program ({exe})")
            elif not os.access(exe, os.X_OK):
                problems.append(f"{path}:{program.lineno}: [{section}] {program.line}: "
                                f"not executable ({exe})")
    if problems:
        raise ValueError("; ".join(problems))
    return parsed
