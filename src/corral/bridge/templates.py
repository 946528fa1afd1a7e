"""argv templates: `{name}` placeholders, and the refusal of templates that need a shell.

Rules of a template:
1. Each element is one argv element. `{name}` is replaced by the parameter's value inside that
   element only; `{{` and `}}` are literal braces. A lone `{` or `}` is an error.
2. argv is never given to a shell. So a template that only makes sense to a shell is refused
   when the settings are loaded, never at run time:
   - a shell (sh, bash, dash, zsh, fish, ksh, busybox sh, `env sh`...) with `-c`,
   - an interpreter whose inline code (`python -c`, `perl -e`, `node -e`...) or an awk / sed
     program that contains a placeholder: the value would become code (injection),
   - shell syntax in an element: `|`, `&&`, `;` standing alone, a redirection (`>`, `2>&1`,
     `<in`), `$(...)`, backticks, `$VAR`, `${...}`, a leading `~`.
3. The program is fixed: argv[0] holds no placeholder, nor does the command a wrapper such as
   `env`, `nice` or `timeout` runs.

Not caught (the declarer's responsibility, said in the docs): programs that interpret an
argument in their own way (`git -c`, make variables, `find -exec` of a parameter).
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class Part(NamedTuple):
    kind: Literal["text", "param"]
    value: str
    """The literal text, or the parameter's name."""


Element = tuple[Part, ...]

SHELLS = frozenset(
    [
        "sh",
        "bash",
        "dash",
        "zsh",
        "fish",
        "ksh",
        "mksh",
        "pdksh",
        "oksh",
        "ash",
        "hush",
        "csh",
        "tcsh",
        "yash",
        "rbash",
        "posh",
        "elvish",
        "nu",
        "xonsh",
        "pwsh",
        "powershell",
        "cmd",
        "cmd.exe",
    ]
)
# Options of a shell that take the next element as their value (so the scan goes past it).
_SHELL_VALUE_OPTIONS = frozenset(["-o", "+o", "-O", "+O", "--rcfile", "--init-file"])
_SHELL_COMMAND_OPTIONS = frozenset(["--command", "-command", "-Command", "/c", "/C", "/k", "/K"])

# Programs that run another program given after their own options (and, for env, VAR=value).
WRAPPERS = frozenset(
    [
        "env",
        "nice",
        "nohup",
        "timeout",
        "stdbuf",
        "setsid",
        "ionice",
        "chrt",
        "taskset",
        "time",
        "sudo",
        "doas",
        "xargs",
        "flock",
        "busybox",
        "exec",
        "command",
        "unshare",
        "nsenter",
        "firejail",
        "strace",
        "ltrace",
        "watch",
    ]
)

# Interpreters and the options whose value is code to run.
EVAL_OPTIONS: dict[str, frozenset[str]] = {
    "python": frozenset(["-c"]),
    "pypy": frozenset(["-c"]),
    "perl": frozenset(["-e", "-E"]),
    "ruby": frozenset(["-e"]),
    "node": frozenset(["-e", "-p", "--eval", "--print"]),
    "nodejs": frozenset(["-e", "-p", "--eval", "--print"]),
    "bun": frozenset(["-e", "--eval", "-p", "--print"]),
    "deno": frozenset(["eval"]),
    "php": frozenset(["-r"]),
    "lua": frozenset(["-e"]),
    "luajit": frozenset(["-e"]),
    "julia": frozenset(["-e", "-E", "--eval", "--print"]),
    "Rscript": frozenset(["-e"]),
    "R": frozenset(["-e"]),
    "osascript": frozenset(["-e"]),
    "tclsh": frozenset(),
}

# Text tools whose first operand (or -e value) is a program: awk runs system(), sed has `e`.
# name -> (options taking a plain value, options whose value is a program, program-file options)
SCRIPT_TOOLS: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {
    "awk": (frozenset(["-v", "-F"]), frozenset(["-e", "--source"]), frozenset(["-f"])),
    "sed": (frozenset(["-l"]), frozenset(["-e", "--expression"]), frozenset(["-f", "--file"])),
}
for _alias, _tool in (("gawk", "awk"), ("mawk", "awk"), ("nawk", "awk"), ("gsed", "sed")):
    SCRIPT_TOOLS[_alias] = SCRIPT_TOOLS[_tool]

OPERATORS = frozenset(["|", "||", "&&", "&", ";", ";;", "|&"])
# find's own terminators of -exec / -ok, which a shell user writes as \; or +.
_FIND_EXEC = frozenset(["-exec", "-execdir", "-ok", "-okdir"])
_REDIRECTION = re.compile(r"[0-9]*(?:>>?|<<?<?|&>>?|>&|<&)(?:&?[0-9-]|[^<>|&]*)")
_SUBSTITUTION = re.compile(r"\$\(|`|\$\{|\$[A-Za-z_]|&&|\|\|")


class TemplateError(ValueError):
    """A template that cannot be used; `index` is the argv element it is about (or None)."""

    def __init__(self, reason: str, *, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


def parse_element(text: str) -> Element:
    """`"ENV={env}"` -> (Part("text", "ENV="), Part("param", "env")). Raises ValueError."""
    parts: list[Part] = []
    literal: list[str] = []
    at = 0
    while at < len(text):
        char = text[at]
        if text.startswith("{{", at) or text.startswith("}}", at):
            literal.append(char)
            at += 2
        elif char == "{":
            end = text.find("}", at)
            name = text[at + 1 : end] if end >= 0 else ""
            if end < 0 or not PLACEHOLDER_NAME.fullmatch(name):
                raise ValueError(
                    f"bad placeholder at character {at + 1} of {text!r}: write {{name}} with "
                    "a parameter name, or {{ for a literal brace"
                )
            if literal:
                parts.append(Part("text", "".join(literal)))
                literal = []
            parts.append(Part("param", name))
            at = end + 1
        elif char == "}":
            raise ValueError(f"lone }} at character {at + 1} of {text!r}: write }}}} for a brace")
        else:
            literal.append(char)
            at += 1
    if literal:
        parts.append(Part("text", "".join(literal)))
    return tuple(parts)


def render(element: Element, values: Mapping[str, str]) -> str:
    """The argv element with every placeholder replaced by its (already checked) value."""
    return "".join(part.value if part.kind == "text" else values[part.value] for part in element)


def placeholders(element: Element) -> Iterator[str]:
    return (part.value for part in element if part.kind == "param")


def program_name(text: str) -> str:
    """`/usr/bin/python3.11` -> `python`: the basename without a version suffix."""
    base = os.path.basename(text)
    stripped = re.sub(r"[0-9.]+$", "", base)
    return stripped or base


def literal_text(element: Element) -> str | None:
    """The element's text when it holds no placeholder, else None."""
    if any(part.kind == "param" for part in element):
        return None
    return "".join(part.value for part in element)


def check_template(elements: Sequence[Element]) -> None:
    """Raise TemplateError when the template relies on a shell or hands code to a parameter."""
    if not elements:
        raise TemplateError("argv is empty: name the program to run")
    if literal_text(elements[0]) in (None, ""):
        raise TemplateError("argv[0] must be a fixed program name, not a parameter", index=0)
    _check_programs(elements)
    code = {at for at, _ in code_positions(elements)}
    for index in range(len(elements)):
        if index not in code:
            _check_syntax(elements, index)


def _check_syntax(elements: Sequence[Element], index: int) -> None:
    text = "".join(p.value if p.kind == "text" else f"{{{p.value}}}" for p in elements[index])
    whole = literal_text(elements[index])
    after_find_exec = any(literal_text(e) in _FIND_EXEC for e in elements[:index])
    if whole in OPERATORS and not (whole == ";" and after_find_exec):
        raise TemplateError(
            f"{whole!r} is shell syntax, but argv is never given to a shell: declare one "
            "command per entry (or a script in the workspace that does both)",
            index=index,
        )
    if whole is not None and _REDIRECTION.fullmatch(whole):
        raise TemplateError(
            f"{whole!r} is a shell redirection, but argv is never given to a shell: the "
            "output comes back to the agent; a command that writes a file names it itself",
            index=index,
        )
    found = _SUBSTITUTION.search(text)
    if found:
        raise TemplateError(
            f"{found.group().strip()!r} in {text!r} expects a shell to expand it, but argv is "
            "never given to a shell: write the value itself, or a parameter",
            index=index,
        )
    if text.startswith("~") and elements[index][0].kind == "text":
        raise TemplateError(f"{text!r}: no shell expands ~ here; write the full path", index=index)


def _check_programs(elements: Sequence[Element]) -> None:
    """Look at every fixed element naming a program: shells, wrappers, interpreters."""
    for index, element in enumerate(elements):
        text = literal_text(element)
        if text is None:
            continue
        name = program_name(text)
        if name in SHELLS or os.path.basename(text) in SHELLS:
            _check_shell(elements, index)
        if (index == 0 or _after_wrapper(elements, index)) and name in WRAPPERS:
            _check_wrapped(elements, index)
    for at, refusal in code_positions(elements):
        if literal_text(elements[at]) is None:
            raise TemplateError(refusal, index=at)


def code_positions(elements: Sequence[Element]) -> Iterator[tuple[int, str]]:
    """Elements that a program in command position runs as code (python -c X, awk X...),
    each with the reason a placeholder there is refused. Their text is another language's,
    so the shell-syntax checks do not apply to them."""
    for index, element in enumerate(elements):
        text = literal_text(element)
        if text is None or not (index == 0 or _after_wrapper(elements, index)):
            continue
        name = program_name(text)
        if name in EVAL_OPTIONS:
            yield from _eval_positions(elements, index, EVAL_OPTIONS[name])
        if name in SCRIPT_TOOLS:
            yield from _script_positions(elements, index, SCRIPT_TOOLS[name])


def _after_wrapper(elements: Sequence[Element], index: int) -> bool:
    """Whether element `index` is in command position behind a wrapper (`env`, `nice`...)."""
    return any(program_name(literal_text(e) or "") in WRAPPERS for e in elements[:index])


def _check_shell(elements: Sequence[Element], index: int) -> None:
    at = index + 1
    while at < len(elements):
        text = literal_text(elements[at])
        if text is None:
            if "".join(p.value for p in elements[at] if p.kind == "text").startswith(("-", "+")):
                raise TemplateError("a shell's options cannot come from a parameter", index=at)
            return
        if text == "--" or not text.startswith(("-", "+")):
            return
        single = re.fullmatch(r"[-+][A-Za-z]+", text)
        if text in _SHELL_COMMAND_OPTIONS or (single and "c" in text[1:]):
            raise TemplateError(
                f"{literal_text(elements[index])} {text} runs a string as shell code: argv is "
                "never given to a shell; declare the program and its arguments directly (a "
                "script in the workspace if you need several steps)",
                index=at,
            )
        at += 2 if text in _SHELL_VALUE_OPTIONS else 1


def _check_wrapped(elements: Sequence[Element], index: int) -> None:
    wrapper = program_name(literal_text(elements[index]) or "")
    for at in range(index + 1, len(elements)):
        text = literal_text(elements[at])
        if text is None:
            raw = "".join(p.value for p in elements[at] if p.kind == "text")
            if raw.startswith("-") or (wrapper == "env" and "=" in raw):
                continue  # an option or assignment with a parameter inside
            raise TemplateError(
                f"the program that {wrapper} runs must be fixed, not a parameter", index=at
            )
        if wrapper == "env" and text.startswith(("-S", "--split-string")):
            raise TemplateError(
                "env -S splits a string into a command line as a shell would", index=at
            )
        if text.startswith("-") or (wrapper == "env" and "=" in text):
            continue
        return


def _eval_positions(
    elements: Sequence[Element], index: int, options: frozenset[str]
) -> Iterator[tuple[int, str]]:
    """The elements an interpreter runs as code (the value of -c, -e...), with the refusal."""
    name = literal_text(elements[index])
    for at in range(index + 1, len(elements) - 1):
        option = literal_text(elements[at])
        if option in options:
            yield (
                at + 1,
                f"{name} {option} would run code containing a parameter (code injection): "
                "pass the value as a separate argument (sys.argv, @ARGV...)",
            )


def _script_positions(
    elements: Sequence[Element],
    index: int,
    tool: tuple[frozenset[str], frozenset[str], frozenset[str]],
) -> Iterator[tuple[int, str]]:
    """The elements awk or sed take as their program, with the refusal."""
    value_options, script_options, file_options = tool
    name = literal_text(elements[index])
    refusal = (
        f"{name}'s program would contain a parameter, and {name} programs can run commands: "
        "pass the value with -v / as a separate file argument instead"
    )
    has_program_option = False
    at = index + 1
    while at < len(elements):
        text = literal_text(elements[at])
        if text in script_options or text in file_options:
            has_program_option = True
            if text in script_options and at + 1 < len(elements):
                yield at + 1, refusal
            at += 2
        elif text in value_options:
            at += 2
        elif text is not None and text.startswith("-") and text != "-":
            at += 1
        else:
            if not has_program_option:
                yield at, refusal
            return
