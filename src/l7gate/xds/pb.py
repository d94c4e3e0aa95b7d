"""Small protobuf helpers the xDS resource builders share (`rbac`, `source_slots`, `resources`,
`mtls_translate`): packing, typed extensions, CIDR ranges and config sources. Pure."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import cidr_pb2, extension_pb2

from ..identity.ipcache import IPNetwork


def pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def typed_ext(name: str, msg: Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(msg))


def cidr(net: IPNetwork) -> cidr_pb2.CidrRange:
    return cidr_pb2.CidrRange(
        address_prefix=str(net.network_address), prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen)
    )


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def ecds_source(type_url: str, default: Message | None = None, *,
                warm: bool = False) -> config_source_pb2.ExtensionConfigSource:
    """`default`: the config until the first one arrives (`warm` false) or only if none arrives
    in time (`warm`: a new listener warms until it has the config), and after a removal."""
    src = config_source_pb2.ExtensionConfigSource(config_source=ads(), type_urls=[type_url])
    if default is not None:
        src.default_config.CopyFrom(pack(default))
        src.apply_default_config_without_warming = not warm
    return src
