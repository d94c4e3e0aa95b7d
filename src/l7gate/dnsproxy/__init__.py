"""The transparent DNS proxy behind Cilium's ``toFQDNs`` selectors and ``rules.dns`` rules.

`DNSProxy` judges each query a pod sends through a callback, forwards the allowed ones to the
resolver the pod asked, and hands the addresses of the answer to another callback before the
pod gets it; `proxy` has the theory of operation, `sockets` the kernel side of transparency,
`messages` the wire format. The package depends on nothing of the agent: the owner wires the
callbacks to its policy, ipcache and flows.
"""

from .messages import Malformed, normalize_name
from .proxy import DNSLimits, DNSProxy, DNSStats
from .types import DNSAnswer, DNSEvent, DNSVerdict

__all__ = ["DNSAnswer", "DNSEvent", "DNSLimits", "DNSProxy", "DNSStats", "DNSVerdict", "Malformed",
           "normalize_name"]
