"""An OpenAPI 3.1 document generated from service descriptors and their HTTP rules.

Every binding is an operation. Messages and enums become
`components.schemas` entries named by their full protobuf name; well-known
types are written inline in their JSON form. The proto comments (from the
descriptor sets of DocumentOptions) become summaries and descriptions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    ServiceDescriptor,
)
from google.rpc import status_pb2

from gateway.comments import Comments
from gateway.jsonparse import offered_values
from gateway.options import DocumentOptions, MethodOptions
from gateway.rules import Binding, Variable, is_map_field, load_bindings, resolve_field

logger = logging.getLogger(__name__)
# The methods OpenAPI's path items have operations for.
_OPERATIONS = frozenset(("get", "put", "post", "delete", "options", "head", "patch", "trace"))

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
STATUS_SCHEMA = status_pb2.Status.DESCRIPTOR.full_name

_INT32 = {
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: ("uint32", 0, 2**32 - 1),
}
_INT64 = {
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_SINT64: "int64",
    FieldDescriptor.TYPE_SFIXED64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FIXED64: "uint64",
}
_NULL_VALUE = "google.protobuf.NullValue"
_NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
_WRAPPERS = ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
# Where a reference to a message's schema points.
_SCHEMAS = "#/components/schemas/"

# Depth at which query parameters stop descending into nested messages.
_MAX_QUERY_DEPTH = 5


def build_openapi(
    services: Iterable[ServiceDescriptor],
    document: DocumentOptions | None = None,
    methods: Mapping[str, MethodOptions] = MappingProxyType({}),
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the services' `google.api.http` bindings."""
    services = tuple(services)
    return _Builder(document or DocumentOptions(), methods).build(services, load_bindings(services))


def summary_of(comment: str) -> str:
    """The first sentence of a comment's first paragraph."""
    paragraph = " ".join(comment.split("\n\n", 1)[0].split())
    sentence = re.match(r"(.+?\.)(\s|$)", paragraph)
    return sentence.group(1) if sentence else paragraph


class _Builder:
    def __init__(self, document: DocumentOptions, methods: Mapping[str, MethodOptions]) -> None:
        self.document = document
        self.methods = methods
        self.comments = Comments(document.descriptor_sets)
        self.schemas: dict[str, Any] = {}
        self.enums: dict[str, EnumDescriptor] = {}

    def build(
        self, services: Sequence[ServiceDescriptor], bindings: Sequence[Binding]
    ) -> dict[str, Any]:
        self._message_ref(status_pb2.Status.DESCRIPTOR)
        self.schemas[STATUS_SCHEMA].setdefault(
            "description", "An error: a gRPC status code, a message, and optional details."
        )
        paths: dict[str, dict[str, Any]] = {}
        names = _path_names(bindings)
        for binding in bindings:
            path = binding.template.with_names(names[binding.template.shape])
            method = binding.http_method.lower()
            if method not in _OPERATIONS:  # a custom rule's, LIST say
                logger.warning(
                    "%s %s of %s is not documented: OpenAPI has no operation for that method",
                    binding.http_method,
                    binding.template.text,
                    binding.method.full_name,
                )
                continue
            operations = paths.setdefault(path, {})
            if method in operations:
                logger.warning(
                    "%s %s of %s is not documented: OpenAPI cannot tell it from %s",
                    binding.http_method,
                    binding.template.text,
                    binding.method.full_name,
                    operations[method]["operationId"],
                )
                continue
            operations[method] = self._operation(binding, names[binding.template.shape])
        unknown = set(self.document.route_parameters) - {_route(binding) for binding in bindings}
        if unknown:
            raise ValueError(f"route_parameters of {', '.join(sorted(unknown))}: no such route")
        for alias in self.document.aliases:
            self.schemas[alias.name] = self._alias(alias.full_name, alias.omit_zero_enum_value)
        document: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": self._info(services),
            "tags": [self._tag(service) for service in services],
            "paths": paths,
            "components": {"schemas": dict(sorted(self.schemas.items()))},
        }
        if self.document.servers:
            document["servers"] = [{"url": url} for url in self.document.servers]
        if self.document.bearer_auth:
            document["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A bearer token."}
            }
            document["security"] = [{"bearer": []}]
        return document

    def _info(self, services: Sequence[ServiceDescriptor]) -> dict[str, Any]:
        description = self.document.description or "\n\n".join(
            filter(None, (self.comments.get(service.full_name) for service in services))
        )
        info = {"title": self.document.title, "version": self.document.version}
        return {**info, "description": description} if description else info

    def _tag(self, service: ServiceDescriptor) -> dict[str, Any]:
        tag = {"name": service.name}
        comment = self.comments.get(service.full_name)
        return {**tag, "description": comment} if comment else tag

    def _operation(self, binding: Binding, path_names: Sequence[str]) -> dict[str, Any]:
        comment = self.comments.get(binding.method.full_name)
        operation: dict[str, Any] = {
            "operationId": binding.operation_id,
            "tags": [binding.method.containing_service.name],
        }
        if comment:
            operation["summary"] = summary_of(comment)
            operation["description"] = comment
        parameters = self._path_parameters(binding, path_names) + self._query_parameters(binding)
        parameters = self._route_constrained(binding, parameters)
        options = self.methods.get(binding.method.full_name, MethodOptions())
        if binding.server_streaming and options.last_event_id_field:
            parameters.append(self._last_event_id(options.last_event_id_field))
        if parameters:
            operation["parameters"] = parameters
        if binding.body:
            operation["requestBody"] = self._request_body(binding)
        operation["responses"] = self._responses(binding, options)
        return operation

    def _path_parameters(self, binding: Binding, path_names: Sequence[str]) -> list[dict[str, Any]]:
        request = binding.method.input_type
        parameters = []
        for name, variable in zip(path_names, binding.template.variables, strict=True):
            field = resolve_field(request, variable.field_path)
            assert field is not None  # checked when the bindings were loaded
            schema = self._constrained(field, self._value_schema(field))
            notes = [self.comments.get(field.full_name)]
            if name != variable.name:
                notes.append(f"Sets `{variable.name}`.")
            if variable.pattern != "*":
                schema = {**schema, "pattern": _pattern_regex(variable)}
                notes.append(f"Matches `{variable.pattern}`.")
            if "/" in variable.pattern or "**" in variable.pattern:
                # OpenAPI's clients percent-encode a path parameter's slashes,
                # which the path's matching takes as part of a segment.
                notes.append("Its slashes go in the path as they are: `%2F` is not read as `/`.")
            parameters.append(
                _parameter(name, "path", schema, "\n\n".join(filter(None, notes)), True)
            )
        return parameters

    def _query_parameters(self, binding: Binding) -> list[dict[str, Any]]:
        if binding.body == "*":
            return []
        bound = {variable.name for variable in binding.template.variables}
        skip = bound | ({binding.body} if binding.body else set()) | binding.followed_fields
        return list(self._fields_as_query(binding.method.input_type, "", skip, (), top=True))

    def _fields_as_query(
        self, message: Descriptor, prefix: str, skip: set[str], seen: tuple[str, ...], top: bool
    ) -> Iterable[dict[str, Any]]:
        for field in message.fields:
            name = prefix + field.name
            if name in skip or is_map_field(field):
                continue
            nested = field.message_type
            if nested is not None and nested.full_name in _WELL_KNOWN:
                # Only the well-known types written as one string fit in a parameter.
                if _WELL_KNOWN[nested.full_name].get("type") != "string":
                    continue
            elif nested is not None and not _is_wrapper(nested):
                if _is_repeated(field) or nested.full_name in seen or len(seen) >= _MAX_QUERY_DEPTH:
                    continue
                yield from self._fields_as_query(
                    nested, f"{name}.", skip, (*seen, message.full_name), top=False
                )
                continue
            comment = self.comments.get(field.full_name)
            enum = field.enum_type
            if enum is not None and enum.full_name != _NULL_VALUE:
                # The zero *_UNSPECIFIED value reads as no value, and is refused.
                offered = self._enum_schema(enum, [*offered_values(enum)])
                is_list = _is_repeated(field)
                schema = {"type": "array", "items": offered} if is_list else offered
            else:
                schema = self._field_schema(field)
            schema = self._constrained(field, schema)
            required = top and _behaviour(field, field_behavior_pb2.REQUIRED)
            parameter = _parameter(name, "query", schema, comment, required)
            if _is_repeated(field):
                parameter.update(style="form", explode=True)
            yield parameter

    def _route_constrained(
        self, binding: Binding, parameters: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """parameters with the keywords DocumentOptions.route_parameters gives them."""
        extra = self.document.route_parameters.get(_route(binding), {})
        unknown = set(extra) - {parameter["name"] for parameter in parameters}
        if unknown:
            raise ValueError(
                f"route_parameters of {_route(binding)}: no parameter {', '.join(sorted(unknown))}"
            )
        return [
            {**each, "schema": {**each["schema"], **extra[each["name"]]}}
            if each["name"] in extra
            else each
            for each in parameters
        ]

    def _last_event_id(self, field_path: str) -> dict[str, Any]:
        description = f"Resume a stream after this event id: sets `{field_path}`."
        return _parameter("Last-Event-ID", "header", {"type": "string"}, description, False)

    def _request_body(self, binding: Binding) -> dict[str, Any]:
        request = binding.method.input_type
        paths = [variable.field_path for variable in binding.template.variables]
        if binding.body == "*":
            schema = self._message_ref(request)
            # (A well-known type, google.protobuf.Empty say, has no schema of its own here.)
            fields = self.schemas.get(request.full_name, {})
            bound = {path[0] for path in paths if len(path) == 1}
            filled = {path[0]: _paths_within(paths, path[0]) for path in paths if len(path) > 1}
            if bound or filled:
                schema = fields = self._without(request, bound, filled)
            # A body that must hold a field cannot be left out.
            required = bool(fields.get("required"))
        else:
            field = request.fields_by_name[binding.body]
            schema = self._constrained(field, self._field_schema(field))
            schema = self._cut(schema, _paths_within(paths, binding.body))
            required = _behaviour(field, field_behavior_pb2.REQUIRED)
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    def _without(
        self, message: Descriptor, bound: AbstractSet[str], filled: Mapping[str, _Paths]
    ) -> dict[str, Any]:
        """message's schema as a body: without the fields the path sets
        (bound), and not requiring of a message the path sets fields of
        (filled, of each the paths within it it sets) what the path gives."""
        known = self.schemas.get(message.full_name)
        if known is None:  # a well-known type: its JSON form is its own
            return self._message_ref(message)
        properties = {k: v for k, v in known["properties"].items() if k not in bound}
        for name, given in filled.items():
            properties[name] = self._cut(properties[name], given)
        # Such a message need be in the body only for what else it requires.
        optional = {name for name in filled if "required" not in properties[name]}
        return _unrequired({**known, "properties": properties}, bound | optional)

    def _cut(self, schema: dict[str, Any], given: _Paths) -> dict[str, Any]:
        """schema saying nothing of its own about the fields the path gives
        (given: their paths within it), which a body may leave out, or give
        as their defaults; a message a path goes into is kept, not required
        for what the path gives. A message's reference is replaced by its
        schema only where that message requires something given, at any
        depth: a reference would require it however the schema beside it
        is cut."""
        target = self._target(schema)
        if target is not None and self._requires(target, given):
            schema = self._opened(schema)
        whole = {path[0] for path in given if len(path) == 1}
        within: dict[str, set[tuple[str, ...]]] = {}
        for path in given:
            if len(path) > 1:
                within.setdefault(path[0], set()).add(path[1:])
        properties = {k: v for k, v in schema.get("properties", {}).items() if k not in whole}
        for name, paths in within.items():
            if name in properties:
                properties[name] = self._cut(properties[name], paths)
        optional = {name for name in within if "required" not in properties.get(name, {})}
        rest = {key: value for key, value in schema.items() if key != "properties"}
        return _unrequired(
            {**rest, "properties": properties} if properties else rest, whole | optional
        )

    def _requires(self, schema: dict[str, Any], given: _Paths) -> bool:
        """Whether schema, or a message's schema it refers to, requires a
        field given, or a message that requires one, at any depth."""
        opened = self._opened(schema)
        required = set(opened.get("required", ()))
        properties = opened.get("properties", {})
        # A field a path goes into is given, in part: not needed in a body.
        return any(
            path[0] in required
            or (
                len(path) > 1
                and path[0] in properties
                and self._requires(properties[path[0]], {path[1:]})
            )
            for path in given
        )

    def _opened(self, schema: dict[str, Any]) -> dict[str, Any]:
        """schema, or where it refers to a message, that message's schema
        with what schema says beside the reference added: of a property, to
        what the message says of it; required, to what the message requires."""
        target = self._target(schema)
        if target is None:
            return schema
        beside = {key: value for key, value in schema.items() if key != "$ref"}
        properties = dict(target.get("properties", {}))
        for name, said in beside.get("properties", {}).items():
            properties[name] = {**properties.get(name, {}), **said}
        required = [*target.get("required", ()), *beside.get("required", ())]
        opened = {**target, **beside, "properties": properties}
        return _unrequired({**opened, "required": list(dict.fromkeys(required))}, set())

    def _target(self, schema: dict[str, Any]) -> dict[str, Any] | None:
        """The message's schema that schema refers to, if any."""
        return self.schemas.get(schema.get("$ref", "").removeprefix(_SCHEMAS)) or None

    def _responses(self, binding: Binding, options: MethodOptions) -> dict[str, Any]:
        output = binding.method.output_type
        if binding.response_body:
            schema = self._field_schema(output.fields_by_name[binding.response_body])
        else:
            schema = self._message_ref(output)
        if binding.server_streaming:
            content = _stream_content(schema)
            description = "A stream of messages."
        else:
            content = {"application/json": {"schema": schema}}
            description = "Success."
        if binding.paginates:
            description += " Every page, concatenated."
        responses: dict[str, Any] = {}
        if options.may_answer_200 or not options.other_success_statuses:
            responses["200"] = {"description": description, "content": content}
        chosen = "Success, as the server chose." if responses else description
        for status in options.other_success_statuses:
            responses[str(status)] = {"description": chosen, "content": content}
        error_schema = {"$ref": f"{_SCHEMAS}{STATUS_SCHEMA}"}
        responses["default"] = {
            "description": "An error.",
            "content": {"application/json": {"schema": error_schema}},
        }
        return responses

    def _alias(self, full_name: str, omit_zero: bool) -> dict[str, Any]:
        if full_name not in self.schemas:
            raise ValueError(
                f"schema alias of {full_name!r}: no such message or enum in the document"
            )
        schema = dict(self.schemas[full_name])
        if omit_zero and "enum" in schema:
            enum = self.enums[full_name]
            names = [value.name for value in enum.values if value.number != 0]
            schema.update(self._enum_schema(enum, names))
        return schema

    # Schemas of fields, messages and enums.

    def _field_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and is_map_field(field):
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._value_schema(value)}
        schema = self._value_schema(field)
        return {"type": "array", "items": schema} if _is_repeated(field) else schema

    def _constrained(self, field: FieldDescriptor, schema: dict[str, Any]) -> dict[str, Any]:
        """schema with the keywords DocumentOptions.field_schemas gives the field."""
        extra = self.document.field_schemas.get(field.full_name)
        return {**schema, **extra} if extra else schema

    def _value_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self._message_ref(field.message_type)
        if field.enum_type is not None:
            return self._enum_ref(field.enum_type)
        return _scalar_schema(field.type)

    def _message_ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if _is_wrapper(message):
            return self._value_schema(message.fields_by_name["value"])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursive types end here
            self.schemas[message.full_name] = self._message_schema(message)
        return {"$ref": f"{_SCHEMAS}{message.full_name}"}

    def _message_schema(self, message: Descriptor) -> dict[str, Any]:
        properties, required = {}, []
        for field in message.fields:
            schema = self._constrained(field, self._field_schema(field))
            comment = self.comments.get(field.full_name)
            if comment:
                schema = {**schema, "description": comment}
            if _behaviour(field, field_behavior_pb2.OUTPUT_ONLY):
                schema = {**schema, "readOnly": True}
            if _behaviour(field, field_behavior_pb2.REQUIRED):
                required.append(field.name)
            properties[field.name] = schema
        result: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            result["required"] = required
        comment = self.comments.get(message.full_name)
        return {**result, "description": comment} if comment else result

    def _enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        if enum.full_name == _NULL_VALUE:
            return {"type": "null"}
        if enum.full_name not in self.schemas:
            self.enums[enum.full_name] = enum
            names = [value.name for value in enum.values]
            self.schemas[enum.full_name] = self._enum_schema(enum, names)
        return {"$ref": f"{_SCHEMAS}{enum.full_name}"}

    def _enum_schema(self, enum: EnumDescriptor, names: Sequence[str]) -> dict[str, Any]:
        """A string schema offering names, the enum's and their comments its description."""
        lines = [self.comments.get(enum.full_name)]
        documented = [(name, self.comments.get(f"{enum.full_name}.{name}")) for name in names]
        if any(text for _, text in documented):
            lines.append(
                "\n".join(f"- `{name}`: {' '.join(text.split())}" for name, text in documented)
            )
        schema: dict[str, Any] = {"type": "string", "enum": [*names]}
        description = "\n\n".join(filter(None, lines))
        return {**schema, "description": description} if description else schema


def _route(binding: Binding) -> str:
    """A binding's route as its rule writes it: `POST /v1/things/{name}`."""
    return f"{binding.http_method} {binding.template.text}"


# Field paths within a message, each a tuple of field names.
_Paths = AbstractSet[tuple[str, ...]]


def _paths_within(paths: Sequence[Sequence[str]], field: str) -> set[tuple[str, ...]]:
    """The paths within message field `field` that path variables set."""
    return {tuple(path[1:]) for path in paths if len(path) > 1 and path[0] == field}


def _unrequired(schema: dict[str, Any], names: AbstractSet[str]) -> dict[str, Any]:
    """schema with names out of its own required list: a body need not hold them."""
    required = [name for name in schema.get("required", []) if name not in names]
    rest = {key: value for key, value in schema.items() if key != "required"}
    return {**rest, "required": required} if required else rest


def _path_names(bindings: Sequence[Binding]) -> dict[str, list[str]]:
    """Variable names per path shape: OpenAPI forbids one path with two sets of names."""
    names: dict[str, list[str]] = {}
    for binding in sorted(
        bindings, key=lambda each: sum(v.name.count(".") for v in each.template.variables)
    ):
        names.setdefault(binding.template.shape, _parameter_names(binding.template.variables))
    return names


def _parameter_names(variables: Sequence[Variable]) -> list[str]:
    """Path parameter names: a nested field's path with `_` for `.`
    (`pipeline.name` is `pipeline_name`: a dot reads as a property access to
    code generators), unless that is another variable's name."""
    plain = {variable.name for variable in variables if "." not in variable.name}
    names = []
    for variable in variables:
        name = variable.name.replace(".", "_")
        names.append(variable.name if name in plain and name != variable.name else name)
    return names


def _pattern_regex(variable: Variable) -> str:
    parts = []
    for segment in variable.pattern.split("/"):
        parts.append({"*": "[^/]+", "**": ".+"}.get(segment, re.escape(segment)))
    return "^" + "/".join(parts) + "$"


def _parameter(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool
) -> dict[str, Any]:
    parameter: dict[str, Any] = {"name": name, "in": where, "required": required, "schema": schema}
    if description:
        parameter["description"] = description
    return parameter


def _stream_content(schema: dict[str, Any]) -> dict[str, Any]:
    status = {"$ref": f"{_SCHEMAS}{STATUS_SCHEMA}"}
    line = {
        "type": "object",
        "description": (
            "One line per message: `result` holds a message; `error` ends the stream on failure."
        ),
        "properties": {"result": schema, "error": status},
    }
    events = {
        "type": "string",
        "description": (
            "Server-Sent Events: `data:` is the JSON of one message; a failure ends the stream "
            "with an `error` event whose data is a Status."
        ),
    }
    return {NDJSON: {"schema": line}, EVENT_STREAM: {"schema": events}}


def _scalar_schema(kind: int) -> dict[str, Any]:
    if kind in _INT32:
        fmt, low, high = _INT32[kind]
        return {"type": "integer", "format": fmt, "minimum": low, "maximum": high}
    if kind in _INT64:
        pattern = r"^[0-9]+$" if _INT64[kind] == "uint64" else r"^-?[0-9]+$"
        return {"type": "string", "format": _INT64[kind], "pattern": pattern}
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return {"anyOf": [{"type": "number", "format": "double"}, _NON_FINITE]}
    if kind == FieldDescriptor.TYPE_FLOAT:
        return {"anyOf": [{"type": "number", "format": "float"}, _NON_FINITE]}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "format": "byte", "contentEncoding": "base64"}
    return {"type": "string"}


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_wrapper(message: Descriptor) -> bool:
    return message.full_name in {f"google.protobuf.{name}Value" for name in _WRAPPERS}


def _behaviour(field: FieldDescriptor, behaviour: int) -> bool:
    return behaviour in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
