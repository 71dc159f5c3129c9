"""Proto comments, read from the source info of serialized FileDescriptorSets.

Generated `_pb2` modules drop source info, so the comments come from a
descriptor set built with `protoc --include_source_info` (see
scripts/generate_stubs.py, which writes one beside each module).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from google.protobuf import descriptor_pb2

# Field numbers of FileDescriptorProto, DescriptorProto, EnumDescriptorProto
# and ServiceDescriptorProto that a SourceCodeInfo.Location path walks.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _MESSAGE_ONEOFS = 2, 3, 4, 8
_ENUM_VALUES = 2
_SERVICE_METHODS = 2


class Comments:
    """Comments keyed by the full name of what they document."""

    def __init__(self, descriptor_sets: Iterable[bytes] = ()) -> None:
        self._by_name: dict[str, str] = {}
        for serialized in descriptor_sets:
            files = descriptor_pb2.FileDescriptorSet.FromString(serialized)
            for file in files.file:
                self._by_name.update(_file_comments(file))

    def get(self, full_name: str) -> str:
        """The comment of a message, field, enum, enum value, service or method; "" if none."""
        return self._by_name.get(full_name, "")


def _file_comments(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, str]]:
    names = dict(_names(file))
    for location in file.source_code_info.location:
        name = names.get(tuple(location.path))
        text = _clean(location.leading_comments or location.trailing_comments)
        if name is not None and text:
            yield name, text


def _names(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    prefix = f"{file.package}." if file.package else ""
    for index, message in enumerate(file.message_type):
        yield from _message_names(message, (_FILE_MESSAGES, index), prefix + message.name)
    for index, enum in enumerate(file.enum_type):
        yield from _enum_names(enum, (_FILE_ENUMS, index), prefix + enum.name)
    for index, service in enumerate(file.service):
        path, name = (_FILE_SERVICES, index), prefix + service.name
        yield path, name
        for number, method in enumerate(service.method):
            yield (*path, _SERVICE_METHODS, number), f"{name}.{method.name}"


def _message_names(
    message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str
) -> Iterator[tuple[tuple[int, ...], str]]:
    yield path, name
    for index, field in enumerate(message.field):
        yield (*path, _MESSAGE_FIELDS, index), f"{name}.{field.name}"
    for index, oneof in enumerate(message.oneof_decl):
        yield (*path, _MESSAGE_ONEOFS, index), f"{name}.{oneof.name}"
    for index, nested in enumerate(message.nested_type):
        yield from _message_names(nested, (*path, _MESSAGE_NESTED, index), f"{name}.{nested.name}")
    for index, enum in enumerate(message.enum_type):
        yield from _enum_names(enum, (*path, _MESSAGE_ENUMS, index), f"{name}.{enum.name}")


def _enum_names(
    enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str
) -> Iterator[tuple[tuple[int, ...], str]]:
    yield path, name
    for index, value in enumerate(enum.value):
        # Keyed under the enum (not its scope) so values of sibling enums never clash.
        yield (*path, _ENUM_VALUES, index), f"{name}.{value.name}"


def _clean(comment: str) -> str:
    lines = comment.strip("\n").splitlines()
    return "\n".join(line[1:] if line.startswith(" ") else line for line in lines).strip()
