"""Typed reading of the files lorafuse reads: parsed once, checked by one model per format.

Each format declares a pydantic model of the fields lorafuse uses, next to its reader;
`parse_json(path, Model)` reads the file and checks it, and every failure is one
LorafuseError (FileFormatError unless the caller names another class) whose message
names the file, the field (a dotted path), what was expected and the value given:

    experts/a/adapter_config.json: field 'lora_alpha': expected a finite number, got NaN

Types are strict ("4" is not an integer, 1 is not true). Python's json accepts the
literals NaN and Infinity; they parse here too, and every number a model reads as
`Finite` refuses them, so a non-finite value is refused where it matters and named by
its field. Keys a model does not name are kept, not refused: other tools write many.
Messages are plain text; escaping them for a terminal is the printer's job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from lorafuse.errors import FileFormatError, LorafuseError

M = TypeVar("M", bound=BaseModel)
MAX_ERRORS = 5


class FileModel(BaseModel):
    """Base of the file models: strict types, unknown keys allowed and kept."""

    model_config = ConfigDict(strict=True, extra="allow")


Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]


def one_of(expected: str, *types: Any) -> Any:
    """A field that is any one of `types` (strictly), with one message when it is none."""
    adapters = [TypeAdapter(t) for t in types]

    def check(value: Any) -> Any:
        for adapter in adapters:
            try:
                return adapter.validate_python(value, strict=True)
            except ValidationError:
                continue
        raise PydanticCustomError("expected", expected)

    return Annotated[Any, AfterValidator(check)]


def _finite_array(value: Any) -> Any:
    # Nested lists of finite numbers (a vector, a matrix, ...).
    if isinstance(value, list):
        for x in value:
            _finite_array(x)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PydanticCustomError("expected", "a (nested) list of finite numbers")
    return value


FiniteArray = Annotated[Any, AfterValidator(_finite_array)]


def read_text(
    path: str | Path, error: type[LorafuseError] = FileFormatError, what: str = ""
) -> str:
    """The UTF-8 text of `path`; `error` naming the file when it is missing or unreadable."""
    where = _where(path, what)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{where} does not exist") from None
    except IsADirectoryError:
        raise error(f"{where} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text (a binary or corrupt file?)") from None
    except OSError as e:
        raise error(f"{where} cannot be read ({e.strerror or type(e).__name__})") from None


def read_json(
    path: str | Path, error: type[LorafuseError] = FileFormatError, what: str = ""
) -> Any:
    """The JSON value in `path`; `error` naming the file when it is missing or not JSON."""
    text = read_text(path, error, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        cut = " (empty or truncated?)" if ends else ""
        raise error(
            f"{_where(path, what)} is not valid JSON{cut}: {e.msg} at line {e.lineno}, "
            f"column {e.colno}"
        ) from None


def check(
    data: Any,
    model: type[M],
    path: str | Path,
    error: type[LorafuseError] = FileFormatError,
    what: str = "",
) -> M:
    """`data` (read from `path`) validated by `model`; `error` naming file and field if not."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(describe(e, _where(path, what), model)) from None


def parse_json(
    path: str | Path,
    model: type[M],
    error: type[LorafuseError] = FileFormatError,
    what: str = "",
) -> M:
    """Read the JSON file `path` and validate it with `model` (see the module docstring).

    `what` (e.g. "expert a") is put before the file name in messages. Raises `error`
    (FileFormatError by default) for a missing, unreadable or invalid file and for each
    field of the wrong type or value (up to five named in one message).
    """
    return check(read_json(path, error, what), model, path, error, what)


def describe(e: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error: where, then per error field, expectation and value."""
    errors = e.errors()
    parts = [_one(err, model) for err in errors[:MAX_ERRORS]]
    more = len(errors) - MAX_ERRORS
    return f"{where}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _where(path: str | Path, what: str) -> str:
    return f"{what}: {path}" if what else str(path)


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "greater_than": "a number > {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number < {lt}",
    "less_than_equal": "a number <= {le}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
    "literal_error": "{expected}",
}


def _one(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    loc = [str(x) for x in err["loc"]]
    field = f"field {'.'.join(loc)!r}: " if loc else ""
    if err["type"] == "missing":
        kind = _type_name(_annotation(model, err["loc"]))
        return f"{field}missing" + (f" (expected {kind})" if kind else "")
    if err["type"] == "value_error":
        return f"{field}{err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "expected":
        expected = err["msg"]
    elif err["type"] in _EXPECTED:
        expected = _EXPECTED[err["type"]].format(**err.get("ctx", {}))
    else:
        expected = err["msg"].removeprefix("Input should be ")
    if not loc and expected == "an object":
        expected = "an object at the top level"
    return f"{field}expected {expected}, got {show(err.get('input'))}"


def show(value: Any, width: int = 60) -> str:
    """A short JSON-like rendering of a value for a message (containers say what they are)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    try:
        text = json.dumps(value, default=lambda v: f"<{type(v).__name__}>")
    except (TypeError, ValueError):
        text = f"<{type(value).__name__}>"
    if len(text) > width:
        text = text[: width - 3] + "..."
    if isinstance(value, (list, tuple)):
        return f"a list {text}"
    if isinstance(value, dict):
        return f"an object {text}"
    return text


def _annotation(model: type[BaseModel] | None, loc: tuple) -> Any:
    # The annotation of the field at `loc` in (nested) `model`, or None when unknown.
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        fields = getattr(annotation, "model_fields", None)
        if fields is not None:
            if str(part) not in fields:
                return None
            annotation = fields[str(part)].annotation
        elif get_origin(annotation) in (list, dict):  # an index or a key: the item type
            annotation = get_args(annotation)[-1]
        else:
            return None
    return _unwrap(annotation)


def _unwrap(annotation: Any) -> Any:
    # X from Annotated[X, ...] and from X | None.
    if get_origin(annotation) is Annotated:
        return _unwrap(get_args(annotation)[0])
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) not in (list, dict) and len(args) == 1:
        return _unwrap(args[0])
    return annotation


def _type_name(annotation: Any) -> str:
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if annotation in simple:
        return simple[annotation]
    origin = get_origin(annotation)
    if origin is list:
        return "a list"
    if origin is dict or hasattr(annotation, "model_fields"):
        return "an object"
    return ""
