"""The plan: a declarative description of one migration, loaded from YAML (SPEC §3).

``load_plan(path)`` is the only way in: it reads the file, expands ``${VAR}`` and
``${VAR:-default}`` in every string value, validates with pydantic (unknown fields are
refused) and raises :class:`~migrator.errors.PlanError` with one message naming each bad field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from migrator.errors import PlanError
from migrator.routing import HASH_FUNCTIONS
from migrator.urls import check_redis_url, mask_url

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_a_flag(v: Any) -> Any:
    # pydantic reads true as 1 (and YAML reads yes and on as true): `rate: on` would be a
    # ceiling of 1 member/s, `shards: true` "at least 2". A flag is not a number.
    if isinstance(v, bool):
        raise ValueError(f"a number, not {str(v).lower()}")
    return v


Int = Annotated[int, BeforeValidator(_not_a_flag)]
Float = Annotated[float, BeforeValidator(_not_a_flag)]


class RedisSpec(_Strict):
    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in {"redis", "rediss", "unix", "redis+sentinel"}:
            raise ValueError(
                f"unsupported scheme {scheme!r}; use redis://, rediss://, unix:// or redis+sentinel://"
            )
        # Parsed as the client will parse it (a port, a db, query options), so that a bad one
        # is found here, before anything is written.
        problem = check_redis_url(v)
        if problem:
            raise ValueError(f"{mask_url(v)} is not a usable Redis URL: {problem}")
        return v


class SourceSpec(_Strict):
    key: str = Field(min_length=1)
    type: Literal["hash", "set", "zset"] | None = None

    @field_validator("type")
    @classmethod
    def _supported(cls, v: str | None) -> str | None:
        # In the plan format (SPEC), refused here rather than by plan apply's preflight only:
        # `plan validate` must not call valid a plan that apply refuses.
        if v in ("set", "zset"):
            raise ValueError(
                f"{v} sources are in the plan format, but this release migrates hashes only"
            )
        return v


class TargetSpec(_Strict):
    key: str
    shards: Int = Field(ge=2, le=16384)
    hash: str = "crc32"

    @field_validator("key")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{shard}" not in v:
            raise ValueError("must contain {shard}, e.g. 'user:info:{shard}'")
        return v

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if v not in HASH_FUNCTIONS:
            raise ValueError(
                f"unknown hash function {v!r}; known: {', '.join(sorted(HASH_FUNCTIONS))}"
            )
        return v

    def shard_key(self, shard: int) -> str:
        return self.key.replace("{shard}", str(shard))

    def shard_keys(self) -> list[str]:
        return [self.shard_key(i) for i in range(self.shards)]


class CopySpec(_Strict):
    batch: Int = Field(default=500, ge=1, le=100_000)
    rate: Float = Field(default=0, ge=0, allow_inf_nan=False)
    max_command_ms: Float = Field(default=1.0, gt=0, le=1000, allow_inf_nan=False)


class GraySpec(_Strict):
    bucketing: Literal["sticky", "random"] = "sticky"
    shadow_sample: Float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)


class CleanupSpec(_Strict):
    mode: Literal["auto", "unlink", "hdel"] = "auto"
    after: float = 0.0
    """Seconds after cutover at which ``migrator run`` cleans up; 0 means only on command."""

    @field_validator("after", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class Plan(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    redis: RedisSpec = RedisSpec()
    source: SourceSpec
    target: TargetSpec
    copy_: CopySpec = Field(default=CopySpec(), alias="copy")
    gray: GraySpec = GraySpec()
    cleanup: CleanupSpec = CleanupSpec()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        if isinstance(v, str) and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", v):
            raise ValueError(
                f"{v!r} is not a job name: use 1-63 of a-z, 0-9 and '-', "
                "starting with a letter or digit"
            )
        return v

    def spec(self) -> dict[str, Any]:
        """The resolved plan as plain data (secrets included: this is what the store keeps)."""
        return self.model_dump(mode="json", by_alias=True)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    def masked(self) -> dict[str, Any]:
        """The resolved plan with the password in the Redis URL replaced by ``***``."""
        spec = self.spec()
        spec["redis"]["url"] = mask_url(spec["redis"]["url"])
        return spec

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Plan:
        return cls.model_validate(spec)


#: The longest duration a plan may give (ten years): a date the scheduler can still compute.
MAX_DURATION_S = 3650 * 86400.0


def parse_duration(v: Any) -> float:
    """``0``, ``90``, ``"2s"``, ``"15m"``, ``"7d"`` → seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a string like '2s', '15m', '7d'")
    seconds: float | None = None
    if isinstance(v, (int, float)):
        try:
            seconds = float(v)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"{v!r} is longer than ten years") from None
    elif isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None or math.isnan(seconds):
        raise ValueError(f"{v!r} is not a duration; use seconds or e.g. '2s', '15m', '7d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{v!r} is longer than ten years")
    return seconds


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string inside ``value``."""
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if var in env and env[var] != "":
            return env[var]
        if default is not None:
            return default
        raise PlanError(
            f"{path}: environment variable ${{{var}}} is not set (and has no :-default)"
        )

    return _ENV_REF.sub(sub, value)


def load_plan(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Plan:
    """Read, expand and validate a plan file. Raises PlanError naming what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"{p}: cannot read plan file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PlanError(
            f"{p}: a plan file is UTF-8 text, and this one is not "
            f"(byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    return parse_plan(text, env, source=str(p))


class _PlanLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but every value it cannot construct is a YAMLError with its
    position: some escape as a bare ValueError (``2025-02-30`` reads as a date and is none)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as e:
            kind = str(node.tag).rsplit(":", 1)[-1]
            if kind == "timestamp":
                problem = (
                    f"{node.value} reads as a date but is not one ({e}); quote it if it is text"
                )
            else:
                problem = f"cannot read {node.value!r} as {kind}: {e}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys: `shards: 4` then `shards: 400` would be 400.
        seen: set[Any] = set()
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys may be given again, to override them
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_plan(text: str, env: Mapping[str, str] | None = None, source: str = "plan") -> Plan:
    try:
        raw = yaml.load(text, Loader=_PlanLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PlanError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise PlanError(f"{source}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: a plan is a YAML mapping with name, source and target")
    try:
        expanded = expand_env(raw, os.environ if env is None else env)
    except PlanError as e:
        raise PlanError(f"{source}: {e.message}") from None
    try:
        return Plan.model_validate(expanded)
    except ValidationError as e:
        raise PlanError(f"{source}: invalid plan\n" + _describe(e)) from None


def _describe(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "missing":
            msg = "field required"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "string_type" and _read_as(err["input"]):
            msg = (
                f"YAML reads this unquoted value as {_read_as(err['input'])}, not text: "
                "put it in quotes"
            )
        else:
            msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def _read_as(value: Any) -> str | None:
    """What an unquoted YAML scalar given for a text field turned into, if not text."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"a date ({value.isoformat()})"
    return None
