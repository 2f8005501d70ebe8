"""What every job shares: its options in the order given, checked against the command's own
argument definitions, and the ``cda2 ...`` line that runs the same job by hand."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Sequence, Tuple, TypeVar

from ..errors import ConfigError
from ..ops import _checks
from ..registry import Registry

__all__ = ["Job", "command_line", "flag_value", "check_seed", "add_model_arguments"]

J = TypeVar("J", bound="Job")


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as the shell command a user would type (``cda2 ...``, quoted where needed)."""
    return shlex.join(["cda2", *map(str, argv)])


def flag_value(v: Any) -> str:
    """One option value as the command line spells it: a float as short as it reads back exactly
    (``0.03``, not ``0.030000000000000002``), anything else as ``str``."""
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def check_seed(seed: int) -> None:
    """A ``--seed`` every command can use (an integer in ``[0, 2**63)``), or a
    :class:`~cda2_ext.errors.ConfigError` naming it."""
    try:
        _checks.seed(seed)
    except (TypeError, ValueError) as err:  # the ops' own check, in their exception types
        raise ConfigError(str(err)) from None


def add_model_arguments(p: argparse.ArgumentParser, arch_help: str) -> None:
    """The options of a command that loads trained runs: ``--arch`` (a user's constructors,
    named again, since a checkpoint never imports code), ``--device`` and ``--unfused``."""
    p.add_argument("--arch", nargs="+", default=[], metavar="PACKAGE.MODULE:FUNCTION",
                   help=arch_help + ", named again: a checkpoint never imports code by itself")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--unfused", action="store_true", help="use the plain-PyTorch reference ops")


@dataclass(frozen=True)
class Job:
    """One ``cda2`` command as a typed request.

    Attributes:
        options: ``(name, value)`` pairs in the order given, each name the destination of one of
            the command's arguments (:meth:`add_arguments`); :meth:`argv` renders them in that
            order, so a printed plan reads as it was written.

    A subclass names its command (:attr:`command_name`), defines its arguments once in
    :meth:`add_arguments` (the CLI adds the same ones to its parser), and implements :meth:`run`.
    """

    options: Tuple[Tuple[str, Any], ...] = ()

    #: The ``cda2`` subcommand.
    command_name: ClassVar[str] = ""
    _parsers: ClassVar[Dict[Tuple[type, int], argparse.ArgumentParser]] = {}

    # ----- the command's arguments ---------------------------------------------------------------
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """Add the command's arguments to ``p`` (the one definition of its flags)."""
        raise NotImplementedError

    @classmethod
    def _parser(cls) -> argparse.ArgumentParser:
        # rebuilt after a record is registered (a weighting, an attack family adds options)
        key = (cls, Registry.changes)
        if key not in Job._parsers:
            p = argparse.ArgumentParser(prog=f"cda2 {cls.command_name}", add_help=False)
            cls.add_arguments(p)
            Job._parsers[key] = p
        return Job._parsers[key]

    @classmethod
    def _actions(cls, name: str) -> List[argparse.Action]:
        found = [a for a in cls._parser()._actions if a.dest == name]
        if not found:
            known = sorted({a.dest for a in cls._parser()._actions})
            raise ConfigError(f"cda2 {cls.command_name} has no option {name!r}; expected one of "
                              f"{', '.join(known)}")
        return found

    # ----- building ------------------------------------------------------------------------------
    @classmethod
    def of(cls: type[J], **options: Any) -> J:
        """A job of ``options`` (in the order given); an unknown name is a
        :class:`~cda2_ext.errors.ConfigError` at once, not when the job runs."""
        for name in options:
            cls._actions(name)
        return cls(tuple(options.items()))

    @classmethod
    def from_args(cls: type[J], args: argparse.Namespace) -> J:
        """The job of parsed command-line arguments: those set to other than their defaults (which
        the job's :meth:`namespace` restores)."""
        defaults = {a.dest: a.default for a in cls._parser()._actions if a.dest != "help"}
        return cls(tuple((d, getattr(args, d)) for d, default in defaults.items()
                         if hasattr(args, d) and getattr(args, d) != default))

    def with_options(self: J, **more: Any) -> J:
        """This job with ``more`` options (replacing earlier values of the same names in place,
        appending new ones)."""
        for name in more:
            self._actions(name)
        kept = [(k, more.pop(k) if k in more else v) for k, v in self.options]
        return dataclasses.replace(self, options=tuple(kept + list(more.items())))

    @property
    def values(self) -> Dict[str, Any]:
        """The options given, by name."""
        return dict(self.options)

    def namespace(self) -> argparse.Namespace:
        """The options as the command's parser would have set them: the given ones over the
        defaults (arguments whose default is to stay unset are left out, as the parser does)."""
        ns = {a.dest: a.default for a in self._parser()._actions
              if a.dest != "help" and a.default is not argparse.SUPPRESS}
        return argparse.Namespace(**{**ns, **self.values})

    # ----- as a command line ---------------------------------------------------------------------
    def argv(self) -> List[str]:
        """The arguments after ``cda2`` that run this job by hand."""
        out = [self.command_name]
        for name, value in self.options:
            out += self._render(name, value)
        return out

    def _render(self, name: str, value: Any) -> List[str]:
        actions = self._actions(name)
        switches = [a for a in actions if a.nargs == 0]
        if switches:  # --flag / --no-flag: the one whose value this is; none for the default
            hit = next((a for a in switches if a.const == value), None)
            return [hit.option_strings[0]] if hit is not None else []
        if value is None:  # unset: the command's own default
            return []
        action = actions[0]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        head = [action.option_strings[0]] if action.option_strings else []
        return head + [flag_value(v) for v in values]

    @property
    def command(self) -> str:
        """The shell command that runs this job (``cda2 ...``)."""
        return command_line(self.argv())

    # ----- running -------------------------------------------------------------------------------
    def run(self) -> int:
        """Do the job in this process, printing what the command prints; the exit status."""
        raise NotImplementedError

