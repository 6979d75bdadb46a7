"""What a spec or profile may write into a job script besides Resources' own tokens: `extra` sbatch flags (an
allow-list, each value a checked token with per-flag rules) and shell lines (`setup`, the `python` command).

Every value here ends up in the sbatch script submitit writes, so each is one line without control
characters, and a flag's value is one token (submitit quotes it) that Slurm's grammar for the flag accepts.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from asbatch.spec.errors import did_you_mean
from asbatch.spec.loading import CONTROL

# sbatch flags a spec may add verbatim; everything else is either a Resources field or owned by the launcher
ALLOWED_EXTRA_FLAGS = frozenset({"mail-type", "mail-user", "exclusive", "reservation", "licenses", "gres",
                                 "comment", "nice", "requeue", "exclude", "nodelist", "gpu-bind", "hint",
                                 "mem-per-gpu", "mem-per-cpu", "gres-flags", "wckey", "switches", "begin",
                                 "deadline", "tmp"})
# refused flags that a Resources field writes (or replaces: one task per GPU, so cpus-per-task is per GPU)
_FLAG_FIELDS = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes",
                "gpus-per-node": "gpus_per_node", "gpus": "gpus_per_node", "cpus-per-task": "cpus_per_task",
                "mem": "mem_gb", "time": "time", "constraint": "constraint", "array": "array_parallelism",
                "cpus-per-gpu": "cpus_per_task", "ntasks-per-node": "gpus_per_node", "ntasks": "gpus_per_node",
                "gpus-per-task": "gpus_per_node"}
# refused flags that asbatch writes itself: why
_OWNED_FLAGS = {"output": "asbatch writes each array task's log under the sweep's .slurm dir",
                "error": "asbatch writes each array task's log under the sweep's .slurm dir",
                "signal": "asbatch asks for USR2 before the time limit ($ASBATCH_SIGNAL_DELAY_S)",
                "dependency": "asbatch writes it from the stage's `after`",
                "job-name": "asbatch names the job <sweep>:<stage>"}
MAX_TOKEN = 256        # characters of one Slurm token or extra-flag value
MAX_SHELL_LINE = 4096  # characters of one setup line or of the python command
MAX_SETUP_LINES = 100
MAX_MEM_GB = 16 * 1024     # 16 TiB per node
MIN_MEM_MB = 64            # less cannot hold a Python process
_EXTRA_VALUE = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*@%+=/-]*")  # '' = a bare flag such as --exclusive
# extra flags: which need a value, which take none, and the values some of them accept
_NEEDS_VALUE = ALLOWED_EXTRA_FLAGS - {"exclusive", "nice", "requeue"}
_BARE = frozenset({"requeue"})
_MAIL_TYPES = frozenset({"NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
                         "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS"})
_EXCLUSIVE = frozenset({"", "user", "mcs", "topo"})
_GRES = re.compile(r"[A-Za-z][A-Za-z0-9_-]*(?::[A-Za-z0-9_.-]+)*(?:,[A-Za-z][A-Za-z0-9_-]*(?::[A-Za-z0-9_.-]+)*)*")
_MAIL_USER = re.compile(r"[A-Za-z0-9_.+-]+(?:@[A-Za-z0-9.-]+)?(?:,[A-Za-z0-9_.+-]+(?:@[A-Za-z0-9.-]+)?)*")
_LISTS = {"hint": ("compute_bound", "memory_bound", "multithread", "nomultithread"),  # one of them
          "gres-flags": ("enforce-binding", "disable-binding", "one-task-per-sharing",  # a comma-separated list
                         "multiple-tasks-per-sharing", "allow-task-sharing")}
_HOST = r"[A-Za-z0-9_.-]*(?:\[[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*\][A-Za-z0-9_.-]*)*"
_HOSTS = (re.compile(rf"(?=[^,]){_HOST}(?:,(?=[^,]){_HOST})*"), "a host list such as n1,gpu[01-04,07]")
_WHEN = (re.compile(r"now(?:\+[0-9]{1,9}(?:second|minute|hour|day|week)?s?)?|today|tomorrow|midnight|noon|teatime|"
                    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:T[0-9]{2}:[0-9]{2}(?::[0-9]{2})?)?|[0-9]{1,2}:[0-9]{2}(?::[0-9]{2})?"
                    r"(?:AM|PM)?", re.IGNORECASE),
         "now+N[seconds|minutes|hours|days|weeks], YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS], today, tomorrow, midnight, "
         "noon or teatime")
_GRAMMARS = {  # flag -> (its values, what they look like)
    "exclude": _HOSTS, "nodelist": _HOSTS, "begin": _WHEN, "deadline": _WHEN,
    "gpu-bind": (re.compile(r"(?:verbose,)?(?:closest|none|(?:single|per_task):[0-9]{1,4}|(?:map_gpu|mask_gpu):"
                            r"[0-9a-fA-Fx*]+(?:,[0-9a-fA-Fx*]+)*)"),
                 "closest, none, single:N, per_task:N, map_gpu:LIST or mask_gpu:LIST (after verbose, if wanted)"),
    "wckey": (re.compile(r"[A-Za-z0-9_.-]+"), "a plain name (letters, digits, _ . -)"),
    "switches": (re.compile(r"[0-9]{1,4}(?:@(?:[0-9]{1,3}-)?[0-9]{1,6}(?::[0-9]{2}){0,2})?"),
                 "COUNT[@MAX-WAIT], e.g. 1@30:00"),
}
_SIZE = re.compile(r"([0-9]{1,12})([KMGT]?)", re.IGNORECASE)  # Slurm sizes: MB, or with a unit K / M / G / T
_MB_PER_UNIT = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
_MIN_SIZE_MB = {"mem-per-gpu": MIN_MEM_MB, "mem-per-cpu": MIN_MEM_MB, "tmp": 0}


# ---------------------------------------------------------------------------------------------- rules

def no_control(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("control characters (newline, carriage return, NUL, tab, escape) are not allowed")
    return value


def _extra_flag(name: str) -> str:
    if name in ALLOWED_EXTRA_FLAGS:
        return name
    as_field, owned = _FLAG_FIELDS.get(name.lstrip("-")), _OWNED_FLAGS.get(name.lstrip("-"))
    hint = f"; use the resources field {as_field!r}" if as_field else f"; {owned}" if owned else \
        did_you_mean(name, ALLOWED_EXTRA_FLAGS)
    raise ValueError(f"sbatch flag not allowed here (allowed: {', '.join(sorted(ALLOWED_EXTRA_FLAGS))}){hint}")


def token(value: str, pattern: re.Pattern[str], allowed: str) -> str:
    """`value` as one Slurm token: no control characters, at most MAX_TOKEN characters, only `pattern`."""
    no_control(value)
    if len(value) > MAX_TOKEN:
        raise ValueError(f"at most {MAX_TOKEN} characters")
    if not pattern.fullmatch(value):
        raise ValueError(f"only letters, digits and {allowed} are allowed")
    return value


def _extra_value(value: str) -> str:
    return token(value, _EXTRA_VALUE, "_ . , : | & ! [ ] * @ % + = / -")


def check_extra_value(flag: str, value: str) -> None:
    """The value rules of each allowed flag (the value is a checked token already); '' is the bare flag."""
    if flag in _NEEDS_VALUE and not value:
        raise ValueError(f"--{flag} needs a value")
    if flag in _BARE and value:
        raise ValueError(f"--{flag} takes no value; write `{flag}: true`")
    if flag == "mail-type" and not set(value.upper().split(",")) <= _MAIL_TYPES:
        raise ValueError(f"mail types are a comma-separated list of {', '.join(sorted(_MAIL_TYPES))}")
    if flag == "mail-user" and not _MAIL_USER.fullmatch(value):
        raise ValueError("expected a user name or e-mail address")
    if flag == "exclusive" and value not in _EXCLUSIVE:
        raise ValueError("expected `exclusive: true` or one of user, mcs, topo")
    if flag == "nice" and value and not (re.fullmatch(r"[+-]?[0-9]{1,10}", value) and abs(int(value)) <= 2147483645):
        raise ValueError("expected an integer between -2147483645 and 2147483645")
    if flag == "gres" and not _GRES.fullmatch(value):
        raise ValueError("expected name[:type]:count[,...], e.g. gpu:a100:2")
    if flag in _LISTS and not (set(value.split(",")) <= set(_LISTS[flag]) and (flag != "hint" or "," not in value)):
        raise ValueError(f"expected {'one of' if flag == 'hint' else 'a comma-separated list of'} "
                         f"{', '.join(_LISTS[flag])}")
    if flag in _GRAMMARS and not _GRAMMARS[flag][0].fullmatch(value):
        raise ValueError(f"expected {_GRAMMARS[flag][1]}")
    if flag in _MIN_SIZE_MB:
        size = _SIZE.fullmatch(value)
        mb = int(size.group(1)) * _MB_PER_UNIT[size.group(2).upper()] if size else -1
        if not _MIN_SIZE_MB[flag] <= mb <= MAX_MEM_GB * 1024:
            raise ValueError(f"expected a size from {_MIN_SIZE_MB[flag]}M to {MAX_MEM_GB // 1024}T: a whole number of "
                             "MB, or one with a unit K, M, G or T (e.g. 16G)")


def _unquoted(line: str) -> tuple[str, bool]:
    """A shell line with its quoted and escaped characters blanked out (what is left has its shell meaning),
    cut at a comment; and whether it had one. An unclosed quote or a trailing backslash is a ValueError: the
    job script would read its next lines as part of this one."""
    out, quote, i = [], "", 0
    while i < len(line):
        c = line[i]
        if quote == "'" or (quote == '"' and c != "\\"):
            quote = "" if c == quote else quote
            out.append(c if not quote else "_")
        elif c == "\\":
            if i + 1 == len(line):
                raise ValueError("a trailing backslash joins the job script's next line to this one")
            out.append("__")
            i += 1
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "#" and (not out or out[-1] in " \t;&|()<>"):
            return "".join(out), True
        else:
            out.append(c)
        i += 1
    if quote:
        raise ValueError(f"a quote ({quote}) is not closed: the job script would read its next lines as part of "
                         "this one")
    return "".join(out), False


def _shell_line(value: str) -> str:
    """One line of the job script: not empty, not too long, quotes closed, no here-document."""
    no_control(value)
    if not value.strip():
        raise ValueError("an empty line; leave it out")
    if len(value) > MAX_SHELL_LINE:
        raise ValueError(f"at most {MAX_SHELL_LINE} characters")
    if re.search(r"(?<!<)<<(?!<)", _unquoted(value)[0]):
        raise ValueError("a here-document (<<) reads the job script's next lines; one line each")
    return value


def _python_command(value: str) -> str:
    """The interpreter command: one shell command to which asbatch appends its own arguments."""
    _shell_line(value)
    masked, comment = _unquoted(value)
    if comment:
        raise ValueError("a '#' outside quotes starts a comment, which would swallow the arguments asbatch appends")
    if re.search(r"[;&|<>]", masked):
        raise ValueError("one command: no ; & | < > outside quotes (asbatch appends its arguments to it)")
    if re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*=", masked):
        raise ValueError("it starts with a variable assignment, which cannot be exec'd; write `env NAME=value "
                         "python3`, or export it in `setup`")
    return value


ExtraFlag = Annotated[str, AfterValidator(_extra_flag)]
ExtraValue = Annotated[str, AfterValidator(_extra_value)]
ShellLine = Annotated[str, AfterValidator(_shell_line)]
PythonCommand = Annotated[str, AfterValidator(_python_command)]
