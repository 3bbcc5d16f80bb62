"""Options declared once: default, type and allowed values next to the option (bottom floor).

A component with options (an objective, for example) declares each as a class attribute::

    class MyLoss(Objective):
        ratio = Option(0.25, low=0.0, high=1.0, doc="fraction of each batch with r != t")

The same declaration serves the constructor (``MyLoss(ratio=0.5)``), the config section
(``objective.ratio=0.5``) and the command line (``key=value`` overrides), so a default or a
range is written in one place.

This module also holds the one registry of named components (objectives, data sources):
:func:`register` files a component under ``(section, kind)``, called once by the floor that owns
it; :mod:`meanflow.config` validates names and options against the same entries, so the config
never imports the floors above it. An objective entry is its class (``option_set()`` gives its
options); a data-source entry has ``reads`` (the ``data.*`` keys it uses).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

class Option:
    """A typed option with its default and allowed values; a descriptor on the owning class.

    Args:
        default: the value when the option is not given; its type (bool, int, float, str) is
            the option's type (ints are accepted for floats).
        low, high: inclusive bounds for numbers (None: unbounded).
        above: exclusive lower bound for numbers (None: none).
        choices: allowed values for strings, or a function returning them (for lists that grow
            as plug-ins register).
        doc: one line on what the option does.
    """

    def __init__(self, default: Any, *, low: float | None = None, high: float | None = None, above: float | None = None,
                 choices: Sequence[str] | Callable[[], Sequence[str]] | None = None, doc: str = ""):
        self.default, self.low, self.high, self.above, self.choices, self.doc = default, low, high, above, choices, doc
        self.type = type(default)
        self.name = ""
        self.check(default, owner="(declaration)")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__["_options"][self.name]

    def allowed(self) -> tuple[str, ...]:
        """The allowed strings (empty: any)."""
        return tuple(self.choices() if callable(self.choices) else self.choices or ())

    def describe(self) -> str:
        """Allowed values in words: 'in [0, 1]', '> 0', 'one of a, b'."""
        if self.allowed():
            return "one of " + ", ".join(self.allowed())
        if self.type is bool:
            return "true or false"
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.low is not None and self.high is not None:
            parts.append(f"in [{self.low:g}, {self.high:g}]")
        elif self.low is not None:
            parts.append(f">= {self.low:g}")
        elif self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts) or ("a number" if self.type in (int, float) else "a string")

    def check(self, value: Any, owner: str, prefix: str = "") -> Any:
        """The value converted to the option's type.

        ValueError 'OWNER: PREFIXNAME must be ALLOWED; got VALUE (DOC)' otherwise.
        """
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type in (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (self.type is float or isinstance(value, int))
            value = self.type(value) if ok else value
            ok = ok and not ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
                             or (self.above is not None and value <= self.above))
        else:
            ok = isinstance(value, str) and (not self.allowed() or value in self.allowed())
        if not ok:
            what = self.describe() if self.type is not int else f"an integer {self.describe()}"
            doc = f" ({self.doc})" if self.doc else ""
            raise ValueError(f"{owner}: {prefix}{self.name} must be {what}; got {value!r}{doc}")
        return value


def declared(cls: type) -> dict[str, Option]:
    """The options of a class and its bases, bases first (a subclass's declaration wins, in the base's place)."""
    found: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Option):
                found[name] = value
    return found


@dataclass(frozen=True)
class OptionSet:
    """The options of one component (``section`` 'objective', ``kind`` 'meanflow', ...).

    ``relations`` checks constraints between options (e.g. t_start <= t_end) on the resolved values.
    """

    section: str
    kind: str
    options: dict[str, Option]
    relations: Callable[[dict[str, Any]], None] | None = None

    @property
    def owner(self) -> str:
        return f"{self.section} {self.kind!r}"

    def resolve(self, given: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """Every option's value: the given ones checked, the others at their default.

        An option this component does not read is an error naming it (and who reads it);
        ``prefix`` is put before option names in messages (the config passes 'objective.').
        """
        for key in given:
            if key not in self.options:
                raise ValueError(self.unknown(key, prefix))
        values = {name: opt.check(given[name], self.owner, prefix) if name in given else opt.default for name, opt in self.options.items()}
        if self.relations is not None:
            self.relations(values)
        return values

    def unknown(self, key: str, prefix: str = "") -> str:
        """Message for an option this component does not read."""
        readers = [k for k in kinds(self.section) if key in options_of(self.section, k).options]
        hint = difflib.get_close_matches(key, list(self.options), n=1)
        message = f"{self.owner} does not read option {prefix}{key}"
        if readers:
            message += f" (read by {self.section} {', '.join(repr(k) for k in readers)}; remove it or change the kind)"
        if hint:
            message += f" (did you mean {prefix}{hint[0]}?)"
        return message + f"; its options: {', '.join(self.options) or 'none'}"


_REGISTRY: dict[str, dict[str, Any]] = {}  # section -> kind -> component, in registration order


def register(section: str, kind: str, component: Any) -> Any:
    """File ``component`` under (section, kind), e.g. ("objective", "meanflow", MeanFlowLoss); returns it."""
    _REGISTRY.setdefault(section, {})[kind] = component
    return component


def kinds(section: str) -> list[str]:
    """Registered kinds of a section, in registration order."""
    return list(_REGISTRY.get(section, {}))


def components(section: str) -> dict[str, Any]:
    """The registered components of a section by kind (a copy, in registration order)."""
    return dict(_REGISTRY.get(section, {}))


def lookup(section: str, kind: str) -> Any:
    """The component filed under (section, kind); ValueError listing the registered kinds."""
    try:
        return _REGISTRY[section][kind]
    except KeyError:
        known = kinds(section)
        hint = difflib.get_close_matches(str(kind), known, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{section}.kind must be one of {', '.join(known)}; got {kind!r}{extra}") from None


def options_of(section: str, kind: str) -> OptionSet:
    """The options of the component filed under (section, kind) (its ``option_set()``)."""
    return lookup(section, kind).option_set()
