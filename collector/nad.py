"""NetworkAttachmentDefinition objects → Network records (pure, never raises).

`spec.config` is a CNI configuration as a JSON string: one plugin (`type` at
the top) or a plugin list (`plugins: [...]`, where the first plugin is the one
that makes the interface and the rest are chained: tuning, portmap, ...).

An empty or absent `spec.config` is valid Multus usage: Multus then reads the
configuration from a file named after the NAD on the node
(`/etc/cni/multus/net.d/<name>.conf`). The Network then has no type, master or
ipam and no config_error: nothing is wrong, the facts are just not in the API.
"""
from __future__ import annotations

from typing import Mapping

from collector.annotations import INVALID_JSON, TOO_LARGE, clean_text, decode_json, sub_mapping
from collector.model import Network

PLANE_KEY = "planewatch.io/plane"
RESOURCE_KEY = "k8s.v1.cni.cncf.io/resourceName"

# config_error values (bounded: they may become a label value).
NOT_A_STRING = "not_a_string"        # spec.config is not text
# TOO_LARGE, INVALID_JSON: as for annotations (longer than MAX_ANNOTATION_CHARS; not JSON)
NOT_AN_OBJECT = "not_an_object"      # JSON, but not an object
INVALID_PLUGINS = "invalid_plugins"  # `plugins` is not a non-empty list of objects
NO_TYPE = "no_type"                  # the (first) plugin has no string `type`
CONFIG_ERRORS = (NOT_A_STRING, TOO_LARGE, INVALID_JSON, NOT_AN_OBJECT, INVALID_PLUGINS, NO_TYPE)

# What collector/kube.py leaves in place of a spec.config it would not keep
# (longer than it accepts): reported as TOO_LARGE, never parsed.
REFUSED_CONFIG = "\x00planewatch: spec.config refused, too large"

# Where plugins name the host-side device: macvlan/ipvlan/vlan `master`,
# host-device `device`, bridge and ovs `bridge`; host-device may instead select
# its device by `pciBusID`, `hwaddr` or `kernelpath` (containernetworking/plugins
# host-device.go), which then stands for the master. First present wins.
MASTER_FIELDS = ("master", "device", "bridge", "pciBusID", "hwaddr", "kernelpath")


def _text(obj: Mapping, key: str) -> str:
    return (clean_text(obj.get(key)) or "").strip()


def _decode_config(config: object) -> tuple[Mapping | None, str]:
    """spec.config → (CNI config object, "") or (None, config_error)."""
    if isinstance(config, Mapping):     # a hand-written YAML object instead of a JSON string
        return config, ""
    if config == REFUSED_CONFIG:
        return None, TOO_LARGE
    if not isinstance(config, str):
        return None, NOT_A_STRING
    value, error = decode_json(config)
    if error:
        return None, error
    return (value, "") if isinstance(value, dict) else (None, NOT_AN_OBJECT)


def _plugins(config: Mapping) -> tuple[list[Mapping], str]:
    """The plugins of a conflist, or the config itself as a one-plugin list."""
    if "plugins" not in config:
        return [config], ""
    plugins = config["plugins"]
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        return [], INVALID_PLUGINS
    return plugins, ""


def _master(plugins: list[Mapping]) -> str:
    for plugin in plugins:
        for key in MASTER_FIELDS:
            if value := _text(plugin, key):
                return value
    return ""


def _ipam(plugins: list[Mapping]) -> str:
    for plugin in plugins:
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and ipam:
            return _text(ipam, "type")
    return ""


def network_from_object(obj: Mapping) -> Network:
    """A NetworkAttachmentDefinition (JSON dict) → Network. Never raises."""
    meta = sub_mapping(obj, "metadata")
    annotations = sub_mapping(meta, "annotations")
    base = dict(namespace=_text(meta, "namespace"), name=_text(meta, "name"),
                plane=_text(annotations, PLANE_KEY),
                resource_name=_text(annotations, RESOURCE_KEY))
    config = sub_mapping(obj, "spec").get("config")
    if config is None or (isinstance(config, str) and not config.strip()):
        return Network(**base)          # configuration from a file on the node (see above)
    decoded, error = _decode_config(config)
    if decoded is None:
        return Network(**base, config_error=error)
    plugins, error = _plugins(decoded)
    if error:
        return Network(**base, config_error=error)
    cni_type = _text(plugins[0], "type")
    # A conflist's name is at its top; a single plugin's is its own.
    return Network(**base, cni_type=cni_type, master=_master(plugins), ipam=_ipam(plugins),
                   config_error="" if cni_type else NO_TYPE,
                   config_name=_text(decoded, "name"), role=_text(plugins[0], "role"))
