"""Mutual authentication: SPIFFE identities, the built-in CA, SVIDs, handshakes, the auth cache.

    ca = BuiltinCA.load_or_create("/var/lib/l7gate/ca", DEFAULT_TRUST_DOMAIN)
    store = SVIDStore(ca, "/run/l7gate/svids")          # any SVIDSource will do
    store.set_identities(local_identities)
    store.start()                                       # rotation thread
    server = MutualAuthServer(store, (node_ip, DEFAULT_PORT)).start()
    auth = AuthManager(store,
                       write=lambda l, r, node, t: dp.set_auth(l, r, boot_ns_for(t), node[0]),
                       delete=lambda l, r, node: dp.delete_auth(l, r, node[0]))
    auth.start()
    auth.set_wanted({(local, remote): {(node_ip_of_remote, DEFAULT_PORT)}, ...})
    auth.request(local, remote)                         # after an "Authentication required" drop
    auth.status()                                       # rows for `l7gate auth status`

Modules: `ca`, `svid` (SVID, verify_peer), `store`, `handshake`, `batch` (many pairs over one
channel), `auth`; the SPIFFE names are
`l7gate.identity.spiffe` (below xds, which names certificates with them too).
"""

from .auth import AuthManager, AuthStatus, Pair, boot_ns_for
from .batch import ChannelRefused, authenticate_batch
from .ca import BuiltinCA, CAError
from ._files import InsecureFileError
from .handshake import (
    DEFAULT_PORT,
    Address,
    AuthError,
    AuthResult,
    Failure,
    MutualAuthServer,
    ServerEvent,
    handshake,
)
from ..identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeIDError, parse_spiffe_id, server_name, spiffe_id
from .store import SVIDFiles, SVIDSource, SVIDStore
from .svid import SVID, Peer, Reason, SVIDError, verify_peer

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TRUST_DOMAIN",
    "Address",
    "AuthError",
    "AuthManager",
    "AuthResult",
    "AuthStatus",
    "BuiltinCA",
    "CAError",
    "ChannelRefused",
    "Failure",
    "InsecureFileError",
    "MutualAuthServer",
    "Pair",
    "Peer",
    "Reason",
    "SVID",
    "SVIDError",
    "SVIDFiles",
    "SVIDSource",
    "SVIDStore",
    "ServerEvent",
    "SpiffeIDError",
    "authenticate_batch",
    "boot_ns_for",
    "handshake",
    "parse_spiffe_id",
    "server_name",
    "spiffe_id",
    "verify_peer",
]
