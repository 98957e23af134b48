"""Declarative parameter tables and the one interpreter that applies them.

A provider model is described by a `ParamTable`: for every OpenAI-side parameter, one or more
`Rule`s saying whether it is passed through, renamed, converted (a pure function), emulated by
the gateway, rejected with a reason, or ignored with a stated reason. `apply_table` is the only
code that reads tables; adapters never re-implement it.

Rules for one parameter are tried in table order and the first whose `when` accepts the value
applies (`passthrough("output_format", when=one_of("png", "jpeg"))` then `emulate("output_format")`).
A table must cover every parameter in `KNOWN_PARAMS` (checked when the table is built), so a
parameter can never vanish silently; fields the gateway does not model are handled by the
table's `unknown` policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from imagegate.core.coerce import coerce_value
from imagegate.core.errors import InvalidRequest, UnsupportedParameter
from imagegate.core.request import ImageRequest, Operation
from imagegate.core.sizes import Size, SizeTarget

__all__ = [
    "GATEWAY_PARAMS",
    "KNOWN_PARAMS",
    "MAX_PARAMS_HEADER_CHARS",
    "SIZE_PARAMS",
    "BuildContext",
    "Mode",
    "ParamTable",
    "Plan",
    "Rule",
    "apply_table",
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
MAX_PARAMS_HEADER_CHARS = 4096  # `x-imagegate-params`; the whole report is in a dry run's `params`
_OMITTED = "; (more omitted)"
SEED_MODULUS = 2**63  # fan-out seeds wrap here, so they stay within every provider's int64 range
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


@dataclass
class Plan:
    """What the gateway will send and do for one route: the exact upstream payloads
    (one per upstream call), what happened to every parameter, and what it must emulate."""

    payloads: list[dict[str, Any]]
    images_per_call: list[int]
    outcomes: dict[str, Mode]
    notes: dict[str, str]
    target: SizeTarget | None

    @property
    def emulated(self) -> frozenset[str]:
        return frozenset(p for p, m in self.outcomes.items() if m is Mode.EMULATED)

    def header(self) -> str:
        """`x-imagegate-params`: `size=converted; n=emulated; style=passthrough`, at most
        MAX_PARAMS_HEADER_CHARS long (then ending in `; (more omitted)`): hundreds of extra fields
        must not make a response head that clients and proxies refuse to read."""
        parts = [f"{param}={mode.value}" for param, mode in self.outcomes.items()]
        text = "; ".join(parts)
        if len(text) <= MAX_PARAMS_HEADER_CHARS:
            return text
        cut = text.rfind("; ", 0, MAX_PARAMS_HEADER_CHARS - len(_OMITTED))
        return text[: max(cut, 0)] + _OMITTED


def apply_table(
    table: ParamTable,
    request: ImageRequest,
    ctx: BuildContext,
    *,
    image_refs: Sequence[str] = (),
    mask_ref: str | None = None,
) -> Plan:
    """Apply `table` to `request`. `image_refs` are the provider-ready references (URLs or data URIs)
    for the input images, prepared by the adapter. Raises InvalidRequest naming the parameter."""
    payload: dict[str, Any] = {}
    sends: dict[str, Any] = {}
    outcomes: dict[str, Mode] = {}
    notes: dict[str, str] = {}
    seed_field: str | None = None
    n_rule: Rule | None = None

    values: dict[str, Any] = {"prompt": request.prompt}
    if request.operation == "edit":
        values["image"] = list(image_refs)
    for key, value in request.given().items():
        values[key] = mask_ref if key == "mask" else value
    values["n"] = request.n
    size_given = [p for p in SIZE_PARAMS if values.pop(p, None) is not None]
    if size_given:
        values["size"] = ctx.target  # a SizeTarget, or None for `auto`

    for param, raw in values.items():
        if param in GATEWAY_PARAMS:
            outcomes[param] = Mode.EMULATED
            continue
        rules = table.by_param.get(param)
        if rules is None:
            if param in KNOWN_PARAMS:
                raise AssertionError(f"table does not cover {param}")  # prevented in __post_init__
            _apply_unknown(table, param, raw, payload, outcomes, notes)
            continue
        for rule in rules:  # the first rule whose `when` accepts the value
            if rule.when is None or rule.when(raw):
                break
        else:
            raise InvalidRequest(f"Invalid value for '{param}': {raw!r} is not supported by this model.", param=param)
        value = _check(rule, raw)
        if rule.mode is Mode.REJECTED:
            raise UnsupportedParameter(f"'{param}' is not supported by this model: {rule.reason}", param=param)
        if param == "n":
            n_rule = rule
        if param == "seed":
            seed_field = rule.to
        mode = rule.mode
        if rule.mode is Mode.IGNORED:
            notes[param] = rule.reason
        elif rule.mode is Mode.EMULATED:
            sends.update(rule.send or {})
        elif rule.mode is Mode.CONVERTED:
            assert rule.fn is not None and rule.to is not None
            converted = rule.fn(value, ctx)
            if converted is not None:
                payload[rule.to] = converted
        elif param != "n":
            assert rule.to is not None
            payload[rule.to] = value
        if param in _STRUCTURAL:
            continue  # reported after the fan-out is known (n), or always present (prompt, image)
        for name in size_given if param == "size" else (param,):
            outcomes[name] = mode

    payload.update(sends)
    for key, value in table.fixed.items():
        payload.setdefault(key, value)

    counts, n_mode = _fan_out(request.n, n_rule)
    if request.n != 1:
        outcomes["n"] = n_mode
    payloads: list[dict[str, Any]] = []
    first_image = 0  # a call's seed is offset by the images before it, so batches never overlap
    for count in counts:
        call = dict(payload)
        if n_rule is not None and n_rule.batch and n_rule.to:
            call[n_rule.to] = count
        if seed_field is not None and request.seed is not None and len(counts) > 1:
            call[seed_field] = (request.seed + first_image) % SEED_MODULUS
        payloads.append(call)
        first_image += count
    return Plan(payloads=payloads, images_per_call=counts, outcomes=outcomes, notes=notes, target=ctx.target)


def _fan_out(n: int, rule: Rule | None) -> tuple[list[int], Mode]:
    batch = rule.batch if rule is not None and rule.batch else 1
    calls = math.ceil(n / batch)
    counts = [batch] * (calls - 1) + [n - batch * (calls - 1)]
    if calls == 1 and rule is not None and rule.batch:
        return counts, rule.mode
    return counts, Mode.EMULATED


def _apply_unknown(
    table: ParamTable, param: str, value: Any, payload: dict[str, Any], outcomes: dict[str, Mode],
    notes: dict[str, str],
) -> None:
    if table.unknown is Mode.REJECTED:
        raise UnsupportedParameter(
            f"Unknown parameter: '{param}'." + (f" {table.unknown_reason}" if table.unknown_reason else ""),
            param=param,
            code="unknown_parameter",
        )
    if table.unknown is Mode.IGNORED:
        notes[param] = table.unknown_reason
    else:
        payload[param] = value
    outcomes[param] = table.unknown


_STRUCTURAL = frozenset({"n", "prompt", "image"})


def _check(rule: Rule, value: Any) -> Any:
    """Coerce a value to the rule's declared type and check its range and choices."""
    param = rule.param
    if rule.type is not None:
        value = coerce_value(value, rule.type, param)
    if rule.choices is not None and value not in rule.choices:
        allowed = ", ".join(f"'{c}'" for c in rule.choices)
        raise InvalidRequest(f"Invalid value: '{value}'. Supported values are: {allowed}.", param=param)
    if (rule.min is not None and value < rule.min) or (rule.max is not None and value > rule.max):
        raise InvalidRequest(
            f"Invalid value: {value}. '{param}' must be between {rule.min} and {rule.max} for this model.",
            param=param,
        )
    if rule.max_items is not None and isinstance(value, list) and len(value) > rule.max_items:
        raise UnsupportedParameter(
            f"This model takes at most {rule.max_items} '{param}' input(s); {len(value)} were given.", param=param
        )
    return value
