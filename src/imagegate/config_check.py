"""Refuse settings that cannot work, in one line each: what `imagegate serve` and
`imagegate config check` run before anything starts.

`check_config(path)` reads the config file and the environment like `load_settings`, and returns
the settings (or None) with the problems found:

    errors     one line per bad setting, naming it (`limits.max_pixels`), what was given, the
               allowed range, and where it came from (`$IMAGEGATE_LIMITS__MAX_PIXELS` or the file):
               a value outside its range, a URL that is not http(s), an unknown key in the file
               (with the closest known one), a route naming an unknown provider, an unreadable file
    warnings   `IMAGEGATE_*` environment variables that name no setting, with the closest known
               name (difflib); they are ignored

`masked_config(settings)` is the effective configuration as YAML with every secret masked
(`SecretStr` fields, passwords inside URLs).
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from imagegate.settings import Settings, merged_config

__all__ = ["ConfigCheck", "check_config", "env_setting_names", "masked_config", "unknown_env_warnings"]

ENV_PREFIX = "IMAGEGATE_"
# Read by the config file or the CLI, not settings themselves.
_NOT_SETTINGS = frozenset({"IMAGEGATE_CONFIG", "IMAGEGATE_DATA_DIR"})
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_SECRET_NAME = re.compile(r"(key|token|secret|password)(_id|_sha256)?$", re.IGNORECASE)


@dataclass
class ConfigCheck:
    settings: Settings | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.settings is not None and not self.errors


def check_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ConfigCheck:
    """Load and check the settings from `path` (or `$IMAGEGATE_CONFIG`, or the packaged default)."""
    env = os.environ if environ is None else environ
    chosen = path or env.get("IMAGEGATE_CONFIG") or None
    source = f"in {chosen}" if chosen else "in the packaged default config"
    check = ConfigCheck(settings=None)
    try:
        text = Path(chosen).read_text("utf-8") if chosen else ""
    except OSError as exc:
        check.errors.append(f"cannot read the config file {chosen}: {exc.strerror or exc}")
        return check
    check.warnings = unknown_env_warnings(env, referenced=set(_ENV_REF.findall(text)))
    try:
        data = merged_config(chosen)
    except ValidationError as exc:  # the environment alone is invalid
        check.errors = _describe(exc, env, source)
        return check
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        check.errors.append(f"cannot read the config file {chosen}: {reason}")
        return check
    check.errors = [f"unknown setting '{loc}' {source}{hint}" for loc, hint in _unknown_keys(data, Settings)]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        check.errors += _describe(exc, env, source)
        return check
    check.errors += _unknown_providers(settings, source)
    check.settings = settings
    return check


# -- unknown names ---------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """`Annotated[X, ...]` -> X; `X | None` -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _fields(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, Any]]:
    """(name, field, the model a nested section holds, `dict` for a free-form mapping, or None)."""
    for name, info in model.model_fields.items():
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield name, info, inner
        elif get_origin(inner) in (dict, list):
            value = _unwrap(get_args(inner)[-1]) if get_args(inner) else Any
            model_of = value if isinstance(value, type) and issubclass(value, BaseModel) else None
            yield name, info, (get_origin(inner).__name__, model_of)
        else:
            yield name, info, None


def _unknown_keys(data: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(location, hint) of every key in `data` that names no field of `model`, recursively."""
    known = {name: nested for name, _, nested in _fields(model)}
    for key, value in data.items():
        loc = f"{prefix}{key}"
        if key not in known:
            close = _closest(str(key), list(known), ".")
            yield loc, (f" (did you mean '{prefix}{close}'?)" if close else f"; known: {', '.join(sorted(known))}")
            continue
        nested = known[key]
        if isinstance(nested, type) and isinstance(value, Mapping):
            yield from _unknown_keys(value, nested, f"{loc}.")
        elif isinstance(nested, tuple) and nested[1] is not None:
            items: Any = value.items() if isinstance(value, Mapping) else enumerate(value or ())
            for item_key, item in items:
                if isinstance(item, Mapping):
                    at = f"{loc}[{item_key}]." if isinstance(item_key, int) else f"{loc}.{item_key}."
                    yield from _unknown_keys(item, nested[1], at)


def _closest(name: str, candidates: list[str], sep: str) -> str | None:
    """The known name `name` most likely meant: in the same section, one that extends it (`TTL` ->
    `TTL_SECONDS`) or that it extends, else the closest by difflib."""
    section = name.rpartition(sep)[0]
    siblings = [c for c in candidates if c.rpartition(sep)[0] == section]
    extended = [c for c in siblings if c.startswith(name) or name.startswith(c)]
    if extended:
        return min(extended, key=lambda c: abs(len(c) - len(name)))
    close = difflib.get_close_matches(name, siblings or candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def env_setting_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> tuple[set[str], set[str]]:
    """(every `IMAGEGATE_*` name of a setting or section, prefixes under which any name is valid)."""
    names: set[str] = set()
    open_prefixes: set[str] = set()
    for name, _, nested in _fields(model):
        env_name = f"{prefix}{name.upper()}"
        names.add(env_name)
        if isinstance(nested, type):
            sub_names, sub_open = env_setting_names(nested, f"{env_name}__")
            names |= sub_names
            open_prefixes |= sub_open
        elif isinstance(nested, tuple) and nested[0] == "dict":
            open_prefixes.add(f"{env_name}__")
    return names, open_prefixes


def unknown_env_warnings(environ: Mapping[str, str], referenced: set[str] | None = None) -> list[str]:
    """One warning per `IMAGEGATE_*` variable that names no setting (and that the config file does
    not read as `${NAME}`), with the closest known name."""
    names, open_prefixes = env_setting_names()
    ignored = _NOT_SETTINGS | {n.upper() for n in referenced or ()}
    warnings = []
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names or upper in ignored:
            continue
        if any(upper.startswith(p) for p in open_prefixes):
            continue
        close = _closest(upper.removeprefix(ENV_PREFIX), [n.removeprefix(ENV_PREFIX) for n in sorted(names)], "__")
        hint = f"did you mean {ENV_PREFIX}{close}?" if close else "it names no setting"
        warnings.append(f"unknown environment variable {var} is ignored: {hint}")
    return warnings


def _unknown_providers(settings: Settings, source: str) -> list[str]:
    from imagegate.providers.registry import PROVIDERS

    return [
        f"invalid setting 'models.{model_id}.routes[{i}].provider' = {route.provider!r} {source}: "
        f"must be one of {', '.join(sorted(PROVIDERS))}"
        for model_id, config in settings.models.items()
        for i, route in enumerate(config.routes)
        if route.provider not in PROVIDERS
    ]


# -- error lines -----------------------------------------------------------------------------------


def _describe(exc: ValidationError, environ: Mapping[str, str], source: str) -> list[str]:
    lines = []
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            continue  # reported by _unknown_keys, with a suggestion
        loc = _loc_text(error["loc"])
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in error["loc"])
        origin = f"from ${env_name}" if env_name in {k.upper() for k in environ} else source
        shown = _shown_value(error, loc)
        reason = str((error.get("ctx") or {}).get("error", "")) if error["type"] == "value_error" else ""
        if reason and not reason.startswith("must be"):  # a check across several settings says it all
            lines.append(f"invalid setting '{loc or 'settings'}' {origin}: {reason}")
        else:
            lines.append(f"invalid setting '{loc}'{shown} {origin}: must be {_allowed(error)}")
    return lines


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _shown_value(error: Any, loc: str) -> str:
    if error["type"] == "missing" or _SECRET_NAME.search(loc.rsplit(".", 1)[-1]):
        return ""
    value = error.get("input")
    if isinstance(value, dict):  # a whole section: its own keys are named elsewhere
        return ""
    if isinstance(value, str):
        value = _mask_url(value)
    text = repr(value)
    return f" = {text[:80]}{'...' if len(text) > 80 else ''}"


def _constraint_text(info: FieldInfo | None) -> str | None:
    if info is None:
        return None
    bounds: dict[str, Any] = {}
    for meta in [*info.metadata, *_annotated_metadata(info.annotation)]:
        for attr in ("gt", "ge", "lt", "le", "min_length"):
            if isinstance(meta, annotated_types.BaseMetadata) and getattr(meta, attr, None) is not None:
                bounds[attr] = getattr(meta, attr)
    kind = "an integer" if _unwrap(info.annotation) is int else "a number"
    if "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']} to {bounds['le']}"
    if "gt" in bounds:
        return f"{kind} greater than {bounds['gt']}"
    if "ge" in bounds:
        return f"{kind} of at least {bounds['ge']}"
    if "min_length" in bounds:
        return "a non-empty string"
    return None


def _annotated_metadata(annotation: Any) -> list[Any]:
    """The constraints of an `Annotated[...]` inside an optional (`PositiveInt | None`)."""
    found: list[Any] = []
    for arg in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ():
        if get_origin(arg) is Annotated:
            for meta in get_args(arg)[1:]:
                found.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
    return found


def _field_at(loc: tuple[int | str, ...]) -> FieldInfo | None:
    model: Any = Settings
    info: FieldInfo | None = None
    for part in loc:
        if isinstance(model, tuple):  # a free-form mapping: this part is its key
            model = model[1]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return info if isinstance(part, int) else None
        found = next(((i, n) for name, i, n in _fields(model) if name == part), None)
        if found is None:
            return None
        info, model = found
    return info


def _allowed(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "given (it is required)"
    if kind == "literal_error":
        return str(ctx.get("expected", "one of the listed values"))
    if kind == "value_error":
        return str(ctx.get("error", error["msg"])).removeprefix("must be ")
    if kind in ("string_type", "string_too_short"):
        return "a non-empty string"
    if kind == "too_short":
        return "a non-empty list"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "a mapping of settings"
    if kind == "list_type":
        return "a list"
    if kind in ("bool_parsing", "bool_type"):
        return "true or false"
    ranged = _constraint_text(_field_at(error["loc"]))
    if ranged is not None:
        return ranged
    if kind.startswith("int"):
        return "an integer"
    if kind.startswith("float") or kind == "finite_number":
        return "a finite number"
    return str(error["msg"]).lower()


# -- the effective configuration ----------------------------------------------------------------------


def _mask_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return value
        host = parts.hostname or ""
        netloc = f"{parts.username}:****@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return value


def _mask(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, name) for v in value]
    if isinstance(value, str):
        return "**********" if value and _SECRET_NAME.search(name) and not value.startswith("*") else _mask_url(value)
    return value


def masked_config(settings: Settings) -> str:
    """The effective configuration as YAML, secrets masked."""
    data = _mask(settings.model_dump(mode="json"))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
