"""The FUSE mount helper's calling convention: `/etc/fstab`, `mount -t fuse.s3fsimg`, systemd `.mount` units.

An fstab line such as

    my-bucket  /mnt/ds  fuse.s3fsimg  ro,_netdev,nofail,allow_other,cache_dir=/var/cache/s3fsimg  0 0

makes `mount` run `mount.fuse3 my-bucket /mnt/ds -o ... -t fuse.s3fsimg` (libfuse's `util/mount.fuse.c`),
which drops the options only `mount` cares about (`_netdev`, `nofail`, `auto`, `noauto`, `user`,
`users`, `nouser`), appends `dev,suid` (unless `nodev`/`nosuid`), sets HOME=/root when it is unset,
and runs, through `/bin/sh -c`,

    s3fsimg my-bucket /mnt/ds -o ro,allow_other,cache_dir=/var/cache/s3fsimg,dev,suid

The program is looked up on the shell's default PATH: util-linux's `mount` starts helpers without
PATH, so `s3fsimg` must be in /usr/local/bin, /usr/bin or /bin (a symlink to a venv's is enough).
The rest of the caller's environment, and its working directory, are passed on.

This module turns that call into the `mount` command's: `translate(argv)` returns the argv for
`s3fsimg mount` plus the variables to put in the environment. Options are the contract's variables
in lower case without their `S3_`/`DATASET_` prefix (`cache_dir`, `endpoint_url`, `prefix`...; a
variable `config.VARIABLES` gains is an option at once), `env_file=PATH` (KEY=VALUE lines: any
variable, AWS credentials), `allow_other`, `nonempty` (`--allow-non-empty`) and `log_file=PATH`.
Priority: options > env_file > the caller's environment. No `.env` of the working directory is read:
a system mount must not depend on where the administrator typed `mount -a`. Options the mount has
no use for (`rw`/`ro`: it is always read-only; `dev`/`suid`/`exec` and their `no` forms: its files
are plain 0444 images; atime flags; `x-*` and `comment=` for systemd and mount) are accepted and
ignored; any other option is an error (a misspelt `cache_dir` must not silently mean /tmp/imgcache).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from s3fsimg.config import VARIABLES, read_env_file
from s3fsimg.errors import ConfigError, UsageError, quoted

#: Options that mean nothing to this mount (see the module docstring).
IGNORED = frozenset({
    "ro", "rw", "defaults", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime",
    "nolazytime", "sync", "async", "dirsync", "silent", "loud", "auto", "noauto", "user", "nouser",
    "users", "owner", "group", "_netdev", "nofail", "default_permissions",
})
#: Options that are flags of `s3fsimg mount`.
FLAGS = {"allow_other": "--allow-other", "nonempty": "--allow-non-empty"}
#: Options with a path value that are not variables.
PATH_OPTIONS = {"log_file": "--log-file"}
#: Variables whose value is a path: made absolute against the caller's directory.
_PATH_VARIABLES = {"DATASET_CACHE_DIR", "DATASET_LOGICAL_MAP"}


def option_variables() -> dict[str, str]:
    """Option name -> variable: `cache_dir` -> `DATASET_CACHE_DIR`, `endpoint_url` -> `S3_ENDPOINT_URL`."""
    names: dict[str, str] = {}
    for var in VARIABLES:
        for prefix in ("S3_", "DATASET_"):
            if var.startswith(prefix):
                names[var[len(prefix):].lower()] = var
    return names


@dataclass
class HelperCall:
    """What a mount helper call means: the `mount` command's argv and the environment to set."""

    mount_args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def is_helper_call(args: list[str], commands: Iterable[str]) -> bool:
    """True when `args` (argv without the program) is `SOURCE MOUNTPOINT [-o OPTS]...`, not a command:
    the first word is no command name and no option, and a second positional word follows it."""
    if len(args) < 2 or args[0].startswith("-") or args[0] in set(commands):
        return False
    return not args[1].startswith("-")


def _absolute(value: str, cwd: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(cwd, value))


def translate(args: list[str], *, cwd: str | None = None) -> HelperCall:
    """`SOURCE MOUNTPOINT [-o OPTS]... [-f]` -> the `mount` command's argv and environment.

    ConfigError (exit 2) for an unknown or malformed option, before anything is mounted.
    """
    cwd = cwd or os.getcwd()
    positional: list[str] = []
    options: list[str] = []
    foreground = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            if i + 1 == len(args):
                raise UsageError("-o: missing its options (-o opt1,opt2)")
            options.extend(args[i + 1].split(","))
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.extend(arg[2:].split(","))
        elif arg in ("-f", "--foreground"):
            foreground = True
        elif arg in ("-v", "-n", "-s"):  # mount's verbose / no-mtab / sloppy: nothing to do here
            pass
        elif arg.startswith("-"):
            raise UsageError(f"{quoted(arg)}: unknown flag of the mount helper form "
                             "(usage: s3fsimg BUCKET MOUNTPOINT [-o opt1,opt2,...] [-f])")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise UsageError("usage: s3fsimg BUCKET MOUNTPOINT [-o opt1,opt2,...] [-f] "
                         f"(got {len(positional)} words that are not options)")
    source, mountpoint = positional

    variables = option_variables()
    from_options: dict[str, str] = {}
    flags: list[str] = []
    env_file: Path | None = None
    for option in options:
        name, has_value, value = option.partition("=")
        if not name or name in IGNORED or name.startswith("x-") or name == "comment":
            continue
        if name == "env_file":
            if not value:
                raise ConfigError("-o env_file: needs a path (env_file=/etc/s3fsimg/dataset.env)")
            env_file = Path(_absolute(value, cwd))
        elif name in FLAGS:
            if has_value:
                raise ConfigError(f"-o {name}: takes no value")
            flags.append(FLAGS[name])
        elif name in PATH_OPTIONS:
            if not value:
                raise ConfigError(f"-o {name}: needs a path")
            flags += [PATH_OPTIONS[name], _absolute(value, cwd)]
        elif name in variables:
            var = variables[name]
            if not has_value:
                if var != "S3_ANONYMOUS":
                    raise ConfigError(f"-o {name}: needs a value ({name}=...)")
                value = "1"
            from_options[var] = _absolute(value, cwd) if var in _PATH_VARIABLES and value else value
        else:
            known = sorted([*variables, "env_file", *FLAGS, *PATH_OPTIONS])
            raise ConfigError(f"-o {quoted(name)}: unknown option (known: {', '.join(known)}; and mount's "
                              "generic ones, which are ignored)")
    env: dict[str, str] = {}
    if env_file is not None:
        if not env_file.is_file():
            raise ConfigError(f"-o env_file={env_file}: no such file")
        env.update(read_env_file(env_file, f"-o env_file={env_file}"))
        for var in _PATH_VARIABLES:
            if env.get(var):
                env[var] = _absolute(env[var], str(env_file.parent))
    env.update(from_options)
    if source:
        bucket = env.get("S3_BUCKET")
        if "S3_BUCKET" in from_options and bucket != source:
            raise ConfigError(f"the source field names bucket {quoted(source)} but -o bucket= names {quoted(bucket)}")
        env["S3_BUCKET"] = source
    mount_args = ["mount", _absolute(mountpoint, cwd), *flags]
    if foreground:
        mount_args.append("--foreground")
    return HelperCall(mount_args=mount_args, env=env)


def apply(call: HelperCall) -> list[str]:
    """Put the call's environment in place (over the caller's), leave the working directory for `/`
    (so no `.env` of the caller's directory is read), and return the `mount` command's argv."""
    os.environ.update(call.env)
    os.chdir("/")
    return call.mount_args
