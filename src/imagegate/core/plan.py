"""The one interpreter of parameter tables: `apply_table` turns a request and a provider model's
`ParamTable` (`core.params`) into a `Plan`, the exact upstream payloads (one per upstream call,
`n` fanned out over calls where the model batches fewer) and what happened to every parameter.

Rules for one parameter are tried in table order and the first whose `when` accepts the value
applies; its value is coerced and checked (type, choices, range, item count) before it is sent,
renamed, converted, emulated, rejected or ignored. Fields no table models follow the table's
`unknown` policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagegate.core.coerce import coerce_value
from imagegate.core.errors import InvalidRequest, UnsupportedParameter
from imagegate.core.params import GATEWAY_PARAMS, KNOWN_PARAMS, SIZE_PARAMS, BuildContext, Mode, ParamTable, Rule
from imagegate.core.request import ImageRequest
from imagegate.core.sizes import SizeTarget

__all__ = ["MAX_PARAMS_HEADER_CHARS", "SEED_MODULUS", "Plan", "apply_table"]

MAX_PARAMS_HEADER_CHARS = 4096  # `x-imagegate-params`; the whole report is in a dry run's `params`
_OMITTED = "; (more omitted)"
SEED_MODULUS = 2**63  # fan-out seeds wrap here, so they stay within every provider's int64 range


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
