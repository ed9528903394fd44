"""Plain data passed along the pipeline: pods, their attachments, resolved views.

Everything here is immutable and free of I/O so parsers and metric builders can be
pure functions over it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

from collector.family import render_labels

# The identity of every per-interface series, in this order.
ATTACHMENT_LABELS = ("namespace", "pod", "network", "interface", "plane")

UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class DeviceInfo:
    """`device-info` of a network-status entry (NPWG device-info spec 1.x)."""

    type: str = ""            # pci | vdpa | vhost-user | memif | "" (absent)
    version: str = ""
    pci_address: str = ""     # VF (or device) PCI address, pci or vdpa
    pf_pci_address: str = ""
    vhost_net: str = ""
    rdma_device: str = ""
    representor_device: str = ""
    parent_device: str = ""   # vdpa
    driver: str = ""          # vdpa
    path: str = ""            # vdpa, vhost-user, memif socket
    mode: str = ""            # vhost-user client|server, memif ethernet|ip|punt
    role: str = ""            # memif master|slave


@dataclass(frozen=True)
class Attachment:
    """One network attached to one pod, as its network-status annotation says."""

    namespace: str
    pod: str
    uid: str
    network: str              # "ns/name" for a NAD; the default network keeps its own name
    interface: str            # name inside the pod; "" when the annotation omits it
    default: bool = False     # carries the pod's default route
    mac: str = ""
    ips: tuple[str, ...] = ()         # as written (may carry /prefix)
    gateway: tuple[str, ...] = ()
    mtu: int | None = None
    dns: Mapping | None = None
    device: DeviceInfo = field(default_factory=DeviceInfo)
    plane: str = UNCLASSIFIED
    # The cluster network's entry (default or not), as collector/netnames.py reads
    # the name: not a secondary network, whatever `default` says.
    cluster: bool = field(default=False, compare=False)
    # The entry's `name` as written (before collector/netnames.py mapped it), so a
    # later NAD can still map it; "" when it is the network as is.
    written_name: str = field(default="", compare=False, repr=False)

    @property
    def addresses(self) -> tuple[str, ...]:
        """IPs without prefix length."""
        return tuple(ip.split("/", 1)[0] for ip in self.ips)

    def label_values(self, interface: str | None = None) -> tuple[str, ...]:
        return (self.namespace, self.pod, self.network,
                self.interface if interface is None else interface, self.plane)


@dataclass(frozen=True)
class Request:
    """One entry of the `k8s.v1.cni.cncf.io/networks` request annotation."""

    network: str              # "ns/name"
    interface: str = ""
    ips: tuple[str, ...] = ()
    mac: str = ""
    default_route: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pod:
    """A pod on this node, reduced to what planewatch needs."""

    namespace: str
    name: str
    uid: str
    node: str = ""
    phase: str = ""
    host_network: bool = False
    terminating: bool = False
    resource_version: str = ""
    attachments: tuple[Attachment, ...] = ()
    requests: tuple[Request, ...] = ()
    missing: tuple[str, ...] = ()       # requested networks absent from network-status
    has_status: bool = False            # a network-status annotation was present
    errors: tuple[str, ...] = ()        # annotation error reasons met while parsing

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NetworkDefinition:
    """A NetworkAttachmentDefinition, reduced."""

    namespace: str
    name: str
    plane: str = ""                     # planewatch.io/plane annotation, "" when absent
    cni_type: str = ""
    master: str = ""
    ipam: str = ""
    resource_name: str = ""             # k8s.v1.cni.cncf.io/resourceName
    config_error: str = ""              # why spec.config did not parse, "" when it did
    config_name: str = ""               # spec.config `name`: what Multus <= 3.4 wrote in network-status
    role: str = ""                      # spec.config `role` (OVN-Kubernetes user-defined networks: primary)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Link:
    """A network interface inside a pod's netns, as netlink reports it."""

    ifindex: int
    name: str
    mac: str = ""
    mtu: int = 0
    up: bool = False
    kind: str = ""                      # veth, macvlan, bridge, ... ("" when unknown)
    master: int = 0                     # ifindex of the bridge/bond it is enslaved to, 0 when none


@dataclass(frozen=True)
class InterfaceView:
    """An attachment resolved to a live interface in the pod's netns.

    `link` is None when the interface is not (or not yet) present, e.g. a
    DPDK-bound VF that has no netdev in the pod.
    """

    attachment: Attachment
    link: Link | None
    # The label when the link carrying the traffic is not the one the annotation
    # names (KubeVirt bridge binding: `<hash>-nic` carries what `pod<hash>` is said to).
    name: str = ""

    @property
    def interface(self) -> str:
        """The name in the pod; for a device with no name at all (a DPDK VF the
        annotation lists without `interface`), its PCI address, so two such VFs of
        one pod on one network stay two series."""
        if self.name:
            return self.name
        if self.link:
            return self.link.name
        return self.attachment.interface or self.attachment.device.pci_address

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return self.attachment.label_values(self.interface)

    @cached_property
    def rendered(self) -> bytes:
        """`labels` rendered for a family labelled ATTACHMENT_LABELS (`Family.add_rendered`):
        views live as long as their pod and links do, so this is done once, not per scrape."""
        return render_labels(ATTACHMENT_LABELS, self.labels)


@dataclass(frozen=True)
class PodView:
    """A pod with its network namespace resolved (or not)."""

    pod: Pod
    netns_path: str = ""                # "" when unresolved
    netns_inode: int = 0
    resolved_by: str = ""               # "netns-dir:mac", "netns-dir:ip", "cgroup", ""
    interfaces: tuple[InterfaceView, ...] = ()
    # (kind, claim) this pod contests with another pod and so was given to no one:
    # ("netns", <namespace>) from the resolver, ("vf", <pci address>) from collector/claims.py
    conflicts: tuple[tuple[str, str], ...] = ()
    # IP -> ifindex the kernel shows in the pod's namespace (resolved pods only)
    addresses: Mapping[str, int] = field(default_factory=dict, compare=False)

    @cached_property
    def devices(self) -> tuple[InterfaceView, ...]:
        """The interfaces whose annotation names a device (a PCI address or an
        RDMA device): all the SR-IOV and RDMA sources and the VF claims look at.
        Most attachments name none; worked out once a view, not every scrape."""
        return tuple(iv for iv in self.interfaces
                     if iv.attachment.device.pci_address or iv.attachment.device.rdma_device)
