"""One exception hierarchy. Each error carries its context (step, tensor, file) and renders as one line."""

from __future__ import annotations

from typing import Any


class MergeEngineError(Exception):
    """Base class of every error mergeengine raises on purpose.

    Args:
        message: what went wrong and, where possible, how to fix it.
        step: id of the recipe step concerned.
        tensor: name of the tensor concerned.
        file: path of the file concerned.
    """

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        tensor: str | None = None,
        file: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.step = step
        self.tensor = tensor
        self.file = file

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}")
        if self.step:
            parts.append(f"step '{self.step}'")
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as class + args + fields, so the error crosses a process boundary whole (a search
        worker, a Ray task): the default would call ``cls(*args)``, which drops the keyword fields
        and breaks subclasses with their own constructor."""
        return _restore, (type(self), self.args, dict(self.__dict__))


def _restore(cls: type[MergeEngineError], args: tuple[Any, ...], fields: dict[str, Any]) -> MergeEngineError:
    """Rebuild a pickled :class:`MergeEngineError` without calling its constructor."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(fields)
    return exc


class RecipeError(MergeEngineError):
    """The recipe is invalid. ``problems`` holds one formatted line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems in recipe")
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


class ModelError(MergeEngineError):
    """A model cannot be found, read or resolved."""


class ShapeError(MergeEngineError):
    """Tensors that must line up do not (names, shapes, vocabularies)."""


class NonFiniteError(MergeEngineError):
    """A result contains NaN or Inf."""


class OutputError(MergeEngineError):
    """The output cannot be written (exists, disk full, permission denied)."""


class ExecutionError(MergeEngineError):
    """An op failed while computing a tensor."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after some of a recipe's save steps had committed their folders.

    A :class:`KeyboardInterrupt`, so everything that handles an interrupt still does.

    Args:
        written: step id -> destination of each save committed before the interrupt (complete).
        unwritten: step id -> destination of each save that was not (nothing is there).
    """

    def __init__(self, written: dict[str, str], unwritten: dict[str, str]) -> None:
        super().__init__(written, unwritten)
        self.written = written
        self.unwritten = unwritten

    def __str__(self) -> str:
        done = ", ".join(f"{dest} (step '{s}')" for s, dest in self.written.items())
        return (f"{done} {'was' if len(self.written) == 1 else 'were'} written completely; "
                f"nothing was written at {', '.join(self.unwritten.values())}")
