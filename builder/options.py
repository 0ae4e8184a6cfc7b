"""One definition per option: a config dataclass field made with `opt` is the only place an option's
name, type, default, choices, help text, command-line flag and pipeline-file key are written.

The `knnlm` subcommands (`add_options`, `from_args`) and the pipeline file's sections (`file_keys`)
are derived from these fields, so an option is added by adding one field. Standard library only:
the command line builds its whole parser from the config modules at start-up.

    @dataclass
    class TrainConfig:
        datastore: str = opt(flag="datastore", metavar="DATASTORE_URI", help="a datastore root", file=False)
        index_factory: str = opt("IVF4096,PQ64", help="faiss index factory string", file="factory")

- the flag is `--` + the field name with `-` for `_` unless `flag` says otherwise (a name without
  `--` is a positional argument; `flag=False`: not on the command line);
- the pipeline-file key is the field name unless `file` says otherwise (`file=False`: not in the file);
- the help shows the default once, as `(default: VALUE)`; a default computed later (None) is
  described by `default_text`.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields

KEY = "knnlm_option"


def opt(default=MISSING, *, help: str = "", default_text: str | None = None, choices: tuple | None = None,
        flag: str | tuple[str, ...] | bool | None = None, metavar: str | None = None, file: str | bool = True,
        group: str | None = None, argparse_kw: dict | None = None, from_cli=None) -> Field:
    """A dataclass field that is also an option (see the module docstring).

    choices: the values the command line accepts; group: options of the same group are mutually
    exclusive on the command line; argparse_kw: further add_argument arguments (e.g. nargs="?");
    from_cli: turns the parsed command-line value into the field's value."""
    meta = {KEY: {"help": help, "default_text": default_text, "choices": choices, "flag": flag, "metavar": metavar,
                  "file": file, "group": group, "argparse_kw": argparse_kw or {}, "from_cli": from_cli}}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def options(cls) -> list[Field]:
    """The fields of a config dataclass that are options, in field order."""
    return [f for f in fields(cls) if KEY in f.metadata]


def meta(f: Field) -> dict:
    return f.metadata[KEY]


def default_of(f: Field):
    """A field's default (MISSING when it has none: a required option)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def kind(f: Field) -> str:
    """bool, int, float, str or list: the field's annotation without `| None`."""
    t = str(f.type).replace(" ", "").replace("|None", "").replace("None|", "").replace("Optional[", "")
    for k in ("list", "bool", "int", "float"):
        if t.startswith(k):
            return k
    return "str"


def flags(f: Field) -> tuple[str, ...]:
    """The command-line spelling of an option (() when it is not on the command line)."""
    flag = meta(f)["flag"]
    if flag is False:
        return ()
    if flag is None:
        return ("--" + f.name.replace("_", "-"),)
    return (flag,) if isinstance(flag, str) else tuple(flag)


def flag_name(f: Field) -> str:
    """The name an error message gives the option: its long flag, also for options only in files."""
    long = [x for x in flags(f) if x.startswith("--")]
    return long[0] if long else "--" + f.name.replace("_", "-")


def file_key(f: Field) -> str | None:
    """The option's key in a pipeline file section (None: not in the file)."""
    key = meta(f)["file"]
    if key is False:
        return None
    return f.name if key is True else key


def file_keys(*classes) -> dict[str, str]:
    """{field: file key} of the options of one pipeline section, made of these configs' options in
    order (an option in several configs, e.g. device, is one key)."""
    out: dict[str, str] = {}
    for cls in classes:
        for f in options(cls):
            key = file_key(f)
            if key is not None and f.name not in out:
                out[f.name] = key
    return out


def help_text(f: Field) -> str:
    """The option's help with its default shown once; % escaped for argparse."""
    m = meta(f)
    shown = m["default_text"]
    d = default_of(f)
    if shown is None and d is not MISSING and d is not None and not isinstance(d, bool) and d != []:
        shown = str(d)
    text = m["help"]
    if shown is not None:
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add the command-line flags of a config dataclass's options to `parser`; the parsed values
    keep the fields' names (see from_args)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in options(cls):
        names = flags(f)
        if not names:
            continue
        m = meta(f)
        k, d = kind(f), default_of(f)
        kw: dict = {"help": help_text(f)}
        if k == "bool" and not m["choices"]:
            kw["action"] = "store_false" if d is True else "store_true"
        else:
            if k in ("int", "float"):
                kw["type"] = int if k == "int" else float
            if k == "list":
                kw["nargs"] = "+"
            if m["choices"]:
                kw["choices"] = m["choices"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
            if d is MISSING:
                if names[0].startswith("-"):
                    kw["required"] = True
            else:
                kw["default"] = None if k == "bool" else d          # a bool with choices: None when not given
        kw.update(m["argparse_kw"])
        target = parser
        if m["group"]:
            target = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_mutually_exclusive_group())
        if names[0].startswith("-"):
            target.add_argument(*names, dest=f.name, **kw)
        else:
            kw.setdefault("metavar", names[0])
            target.add_argument(f.name, **kw)


def from_args(cls, args: argparse.Namespace, **extra):
    """The config of a parsed command line: every field the namespace holds (the subcommand's flags
    and the global ones of the same name), each through its `from_cli`; `extra` overrides."""
    kw = {}
    for f in fields(cls):
        if f.name in extra or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        convert = f.metadata.get(KEY, {}).get("from_cli")
        kw[f.name] = convert(v) if convert else v
    return cls(**kw, **extra)
