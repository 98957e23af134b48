"""Declarative parameter tables: the rules and the tables made of them.

A provider model is described by a `ParamTable`: for every OpenAI-side parameter, one or more
`Rule`s saying whether it is passed through, renamed, converted (a pure function), emulated by
the gateway, rejected with a reason, or ignored with a stated reason. `core.plan.apply_table` is
the only code that reads tables; adapters never re-implement it.

Rules for one parameter are tried in table order and the first whose `when` accepts the value
applies (`passthrough("output_format", when=one_of("png", "jpeg"))` then `emulate("output_format")`).
A table must cover every parameter in `KNOWN_PARAMS` (checked when the table is built), so a
parameter can never vanish silently; fields the gateway does not model are handled by the
table's `unknown` policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from imagegate.core.request import Operation
from imagegate.core.sizes import Size, SizeTarget

__all__ = [
    "GATEWAY_PARAMS",
    "KNOWN_PARAMS",
    "SIZE_PARAMS",
    "BuildContext",
    "Mode",
    "ParamTable",
    "Rule",
    "convert",
    "emulate",
    "ignore",
    "one_of",
    "passthrough",
    "reject",
    "rename",
]


class Mode(StrEnum):
    PASSTHROUGH = "passthrough"
    RENAMED = "renamed"
    CONVERTED = "converted"
    EMULATED = "emulated"
    REJECTED = "rejected"
    IGNORED = "ignored"


# Parameters every table must say something about (structural `prompt` and `image` included).
KNOWN_PARAMS: frozenset[str] = frozenset(
    {
        "prompt",
        "image",
        "mask",
        "n",
        "size",
        "output_format",
        "output_compression",
        "quality",
        "background",
        "negative_prompt",
        "seed",
        "cfg_scale",
        "num_inference_steps",
        "user",
        "moderation",
        "style",
        "input_fidelity",
    }
)
# Parameters that are always the gateway's own job, whatever the provider: they never reach a table.
GATEWAY_PARAMS: Mapping[str, str] = {
    "response_format": "delivery (url or b64_json) is done by the gateway",
    "stream": "the gateway streams OpenAI's SSE events",
    "partial_images": "partial images are sent only where a provider gives them",
}
# Parameters that resolve, together, into the one `size` target a table's `size` rules receive.
SIZE_PARAMS: tuple[str, ...] = ("size", "aspect_ratio", "resolution")


@dataclass(slots=True)
class BuildContext:
    """What conversion functions may read besides the parameter's own value."""

    operation: Operation
    target: SizeTarget | None = None
    input_size: Size | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


Converter = Callable[[Any, BuildContext], Any]
Predicate = Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    param: str
    mode: Mode
    to: str | None = None
    fn: Converter | None = None
    when: Predicate | None = None
    type: type | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    max_items: int | None = None  # lists (images): more is a 400
    batch: int | None = None  # `n` only: the most images one upstream call may return
    send: Mapping[str, Any] | None = None  # emulate: fixed fields sent upstream instead
    reason: str = ""

    def describe(self) -> str:
        """One line for the support matrix."""
        target = f" -> {self.to}" if self.to and self.to != self.param else ""
        extra = f" (max {self.batch} per call, more emulated)" if self.batch else ""
        reason = f": {self.reason}" if self.reason else ""
        return f"{self.mode.value}{target}{extra}{reason}"


def one_of(*values: Any) -> Predicate:
    allowed = frozenset(values)
    return lambda value: value in allowed


def passthrough(
    param: str,
    *,
    when: Predicate | None = None,
    type: type | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Rule:
    return Rule(param, Mode.PASSTHROUGH, to=param, when=when, type=type, min=min, max=max,
                choices=tuple(choices) if choices is not None else None)


def rename(
    param: str,
    *,
    to: str,
    when: Predicate | None = None,
    type: type | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | None = None,
    batch: int | None = None,
    max_items: int | None = None,
) -> Rule:
    return Rule(param, Mode.RENAMED, to=to, when=when, type=type, min=min, max=max,
                choices=tuple(choices) if choices is not None else None, batch=batch, max_items=max_items)


def convert(
    param: str,
    *,
    to: str,
    fn: Converter,
    when: Predicate | None = None,
    max_items: int | None = None,
    reason: str = "",
) -> Rule:
    return Rule(param, Mode.CONVERTED, to=to, fn=fn, when=when, max_items=max_items, reason=reason)


def emulate(
    param: str,
    *,
    when: Predicate | None = None,
    send: Mapping[str, Any] | None = None,
    reason: str = "",
) -> Rule:
    return Rule(param, Mode.EMULATED, when=when, send=send, reason=reason)


def reject(param: str, *, reason: str, when: Predicate | None = None) -> Rule:
    return Rule(param, Mode.REJECTED, when=when, reason=reason)


def ignore(param: str, *, reason: str, when: Predicate | None = None) -> Rule:
    return Rule(param, Mode.IGNORED, when=when, reason=reason)


@dataclass(frozen=True)
class ParamTable:
    """Everything one provider model does to a request, top to bottom."""

    rules: tuple[Rule, ...]
    unknown: Mode = Mode.PASSTHROUGH  # PASSTHROUGH or REJECTED for fields the gateway does not model
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always sent unless a rule set the field
    unknown_reason: str = ""
    # param -> its rules in table order, built once (`apply_table` looks up every given parameter)
    by_param: Mapping[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_param: dict[str, tuple[Rule, ...]] = {}
        for rule in self.rules:
            by_param[rule.param] = (*by_param.get(rule.param, ()), rule)
        object.__setattr__(self, "by_param", by_param)
        missing = KNOWN_PARAMS - {rule.param for rule in self.rules}
        if missing:
            raise ValueError(f"parameter table does not cover: {', '.join(sorted(missing))}")
        if self.unknown not in (Mode.PASSTHROUGH, Mode.REJECTED, Mode.IGNORED):
            raise ValueError("unknown fields can only be passed through, rejected or ignored")
        for rule in self.rules:
            if rule.param in GATEWAY_PARAMS:
                raise ValueError(f"{rule.param} is handled by the gateway, not by tables")
            if rule.batch is not None and rule.param != "n":
                raise ValueError("only `n` can batch")

    def rules_for(self, param: str) -> list[Rule]:
        return list(self.by_param.get(param, ()))

    @property
    def n_batch(self) -> int:
        """How many images one upstream call can return natively."""
        for rule in self.rules_for("n"):
            if rule.batch:
                return rule.batch
        return 1

    def describe(self) -> dict[str, str]:
        """param -> human description, for the README's support matrix."""
        out: dict[str, str] = {}
        for rule in self.rules:
            line = rule.describe()
            out[rule.param] = f"{out[rule.param]}; otherwise {line}" if rule.param in out else line
        for param, reason in GATEWAY_PARAMS.items():
            out[param] = f"emulated: {reason}"
        for param in SIZE_PARAMS[1:]:
            out[param] = f"as size: {out['size']}"
        out["(other fields)"] = self.unknown.value + (f": {self.unknown_reason}" if self.unknown_reason else "")
        return out
