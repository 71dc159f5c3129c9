"""`google.api.http` rules as routes: path templates, bindings and the route table.

A path template follows the HttpRule grammar::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

Templates are matched against the raw (still percent-encoded) request path,
so an encoded `/` (`%2F`) never splits a segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

# The fields of AIP-158 pagination, which bare-array bindings follow.
PAGE_TOKEN = "page_token"
PAGE_SIZE = "page_size"
NEXT_PAGE_TOKEN = "next_page_token"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r"[^/{}:*=]+")
_SINGLE = "[^/]+"
_MULTI = "[^/]+(?:/[^/]+)*"


@dataclass(frozen=True)
class Variable:
    """A `{field.path=pattern}` of a template."""

    field_path: tuple[str, ...]
    pattern: str

    @property
    def name(self) -> str:
        """The dotted field path, as written in the template."""
        return ".".join(self.field_path)

    @property
    def multi_segment(self) -> bool:
        """Whether the value may span several path segments."""
        return "/" in self.pattern or self.pattern == "**"

    def decode(self, raw: str) -> str:
        """Percent-decode a captured value; multi-segment values keep `%2F` encoded."""
        if self.multi_segment:
            raw = re.sub("%2[Ff]", "%252F", raw)
        # Bytes that are not UTF-8 stay as surrogates, for the request to refuse.
        return unquote(raw, errors="surrogateescape")


@dataclass(frozen=True)
class PathTemplate:
    """A parsed path template and the regular expression that matches it."""

    text: str
    # The template with every variable written as "{}" (for clash checks).
    shape: str
    verb: str
    variables: tuple[Variable, ...]
    regex: re.Pattern[str]
    # Ranks templates that match the same path: more literal text wins.
    specificity: tuple[int, int, int]

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The decoded variable values if the path matches, else None."""
        found = self.regex.fullmatch(raw_path)
        if found is None:
            return None
        return {
            variable.name: variable.decode(found.group(f"v{index}"))
            for index, variable in enumerate(self.variables)
        }

    def with_names(self, names: Sequence[str]) -> str:
        """The template with its variables written as `{name}` (OpenAPI style)."""
        names_iter = iter(names)
        return re.sub(r"\{[^}]*\}", lambda _: "{" + next(names_iter) + "}", self._path_part()) + (
            f":{self.verb}" if self.verb else ""
        )

    def _path_part(self) -> str:
        return self.text[: -len(self.verb) - 1] if self.verb else self.text


def parse_template(text: str) -> PathTemplate:
    """Parse a path template; ValueError names what is wrong with it."""
    if not text.startswith("/"):
        raise ValueError(f"path template {text!r} must start with '/'")
    path, verb = _split_verb(text)
    regex, shape = [], []
    variables: list[Variable] = []
    literals = wildcards = 0
    for segment in _split_segments(path[1:], text):
        if segment.startswith("{"):
            variable = _parse_variable(segment, text)
            inner, inner_literals = _segments_regex(variable.pattern.split("/"), text)
            regex.append(f"(?P<v{len(variables)}>{inner})")
            shape.append("{}")
            variables.append(variable)
            literals += inner_literals
            continue
        part, part_literals = _segments_regex([segment], text)
        regex.append(part)
        shape.append(segment)
        literals += part_literals
        wildcards += segment == "**"
    verb_regex = ":" + re.escape(verb) if verb else ""
    names = [variable.name for variable in variables]
    if len(set(names)) != len(names):
        raise ValueError(f"path template {text!r} binds a field twice")
    return PathTemplate(
        text=text,
        shape="/" + "/".join(shape) + (f":{verb}" if verb else ""),
        verb=verb,
        variables=tuple(variables),
        regex=re.compile("/" + "/".join(regex) + verb_regex + "/?"),
        specificity=(literals, 1 if verb else 0, -wildcards),
    )


def _split_verb(text: str) -> tuple[str, str]:
    last = text.rsplit("/", 1)[-1]
    if "}" in last:
        last = last.rsplit("}", 1)[-1]
    if ":" not in last:
        return text, ""
    verb = last.rsplit(":", 1)[1]
    if not _LITERAL.fullmatch(verb):
        raise ValueError(f"path template {text!r} has an invalid verb")
    return text[: -len(verb) - 1], verb


def _split_segments(path: str, text: str) -> list[str]:
    segments, depth, current = [], 0, ""
    for char in path:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"path template {text!r} has unbalanced braces")
        if char == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"path template {text!r} has unbalanced braces")
    segments.append(current)
    if any(not segment for segment in segments):
        raise ValueError(f"path template {text!r} has an empty segment")
    return segments


def _parse_variable(segment: str, text: str) -> Variable:
    if not segment.endswith("}"):
        raise ValueError(f"path template {text!r}: {segment!r} is not a variable")
    field_path, _, pattern = segment[1:-1].partition("=")
    fields = tuple(field_path.split("."))
    if not all(_IDENT.fullmatch(field) for field in fields):
        raise ValueError(f"path template {text!r}: {field_path!r} is not a field path")
    return Variable(fields, pattern or "*")


def _segments_regex(segments: Iterable[str], text: str) -> tuple[str, int]:
    parts, literals = [], 0
    for segment in segments:
        if segment == "*":
            parts.append(_SINGLE)
        elif segment == "**":
            parts.append(_MULTI)
        elif _LITERAL.fullmatch(segment):
            parts.append(re.escape(segment))
            literals += 1
        else:
            raise ValueError(f"path template {text!r}: invalid segment {segment!r}")
    return "/".join(parts), literals


@dataclass(frozen=True)
class Binding:
    """One HTTP method and path bound to one gRPC method."""

    method: MethodDescriptor
    http_method: str
    template: PathTemplate
    # "" (no body), "*" (every field not bound by the path) or a field name.
    body: str
    # "" (the whole response) or the name of the response field to answer with.
    response_body: str
    # 0 for the rule itself, 1.. for its additional_bindings.
    index: int

    @property
    def operation_id(self) -> str:
        """A unique name: `Service_Method`, then `Service_Method2`, … for additional bindings."""
        base = f"{self.method.containing_service.name}_{self.method.name}"
        return base + (str(self.index + 1) if self.index else "")

    @property
    def server_streaming(self) -> bool:
        """Whether the method streams its responses."""
        return bool(self.method.server_streaming)

    @property
    def paginates(self) -> bool:
        """Whether to follow page tokens: the client of a bare array (or of a map
        field's object) cannot see them."""
        if not self.response_body:
            return False
        output, request = self.method.output_type, self.method.input_type
        field = output.fields_by_name[self.response_body]
        return (
            _is_repeated(field)
            and _is_string(output.fields_by_name.get(NEXT_PAGE_TOKEN))
            and _is_string(request.fields_by_name.get(PAGE_TOKEN))
        )

    @property
    def followed_fields(self) -> frozenset[str]:
        """The request fields the gateway sets itself as it follows pages,
        which a request may not: page_token, and page_size (each page is
        one call, so the client's size would only multiply the calls)."""
        return frozenset((PAGE_TOKEN, PAGE_SIZE)) if self.paginates else frozenset()


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def is_map_field(field: FieldDescriptor) -> bool:
    """Whether a field is a map (a repeated field of map entries)."""
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _is_string(field: FieldDescriptor | None) -> bool:
    return (
        field is not None and field.type == FieldDescriptor.TYPE_STRING and not _is_repeated(field)
    )


def load_bindings(services: Iterable[ServiceDescriptor]) -> tuple[Binding, ...]:
    """Every binding of every method that has a `google.api.http` option."""
    bindings: list[Binding] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            if method.client_streaming:
                raise ValueError(f"{method.full_name}: client streaming cannot be transcoded")
            rules = [rule, *rule.additional_bindings]
            bindings += [_binding(method, each, index) for index, each in enumerate(rules)]
    return tuple(bindings)


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int) -> Binding:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise ValueError(f"{method.full_name}: an HttpRule without a method and path")
    if pattern == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, path = pattern.upper(), getattr(rule, pattern)
    try:
        template = parse_template(path)
    except ValueError as error:
        raise ValueError(f"{method.full_name}: {error}") from None
    binding = Binding(method, http_method, template, rule.body, rule.response_body, index)
    _check_fields(binding)
    return binding


def _check_fields(binding: Binding) -> None:
    name = binding.method.full_name
    request, response = binding.method.input_type, binding.method.output_type
    for variable in binding.template.variables:
        leaf = resolve_field(request, variable.field_path)
        if leaf is None or _is_repeated(leaf) or leaf.type == FieldDescriptor.TYPE_MESSAGE:
            raise ValueError(
                f"{name}: path variable {variable.name!r} is not a singular scalar field"
            )
    if binding.body not in ("", "*") and binding.body not in request.fields_by_name:
        raise ValueError(f"{name}: body field {binding.body!r} is not a field of the request")
    if binding.response_body and binding.response_body not in response.fields_by_name:
        raise ValueError(f"{name}: response_body {binding.response_body!r} is not a response field")


def resolve_field(message: Descriptor, path: Sequence[str]) -> FieldDescriptor | None:
    """The field a dotted path names, through singular message fields; None if none."""
    field = None
    for position, name in enumerate(path):
        field = message.fields_by_name.get(name)
        if field is None:
            return None
        if position < len(path) - 1:
            if field.message_type is None or _is_repeated(field):
                return None
            message = field.message_type
    return field


@dataclass(frozen=True)
class RouteMatch:
    """The binding a request resolved to, with its decoded path variables."""

    binding: Binding
    variables: dict[str, str]


class RouteTable:
    """Resolves a request's method and raw path to a binding."""

    def __init__(self, bindings: Sequence[Binding]) -> None:
        seen: dict[tuple[str, str], Binding] = {}
        for binding in bindings:
            key = (binding.http_method, binding.template.regex.pattern)
            if key in seen:
                clash = seen[key].method.full_name
                raise ValueError(
                    f"{binding.http_method} {binding.template.text} is bound by both "
                    f"{clash} and {binding.method.full_name}"
                )
            seen[key] = binding
        self.bindings = tuple(
            sorted(bindings, key=lambda each: each.template.specificity, reverse=True)
        )

    def resolve(self, http_method: str, raw_path: str) -> RouteMatch | None:
        """The most specific binding of this method whose template matches the path."""
        for binding in self.bindings:
            if binding.http_method != http_method:
                continue
            variables = binding.template.match(raw_path)
            if variables is not None:
                return RouteMatch(binding, variables)
        return None

    def allowed_methods(self, raw_path: str) -> list[str]:
        """The HTTP methods bound to templates that match the path (empty: unknown path)."""
        bound = [each for each in self.bindings if each.template.match(raw_path) is not None]
        methods = {each.http_method for each in bound}
        if any(each.http_method == "GET" and not each.server_streaming for each in bound):
            methods.add("HEAD")
        return sorted(methods)
