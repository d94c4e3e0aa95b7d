"""Numeric identity allocation in the kvstore.

Theory of operation
-------------------
Global (cluster-wide) identities live under `l7gate/identities/v1/`:

    id/<n>               -> canonical labels   the number's owner: claimed with `create`
    value/<labels>       -> "<n>"              the index from labels to number: `create` too
    ref/<n>/<owner>      -> b""                "node <owner> uses n" (on the owner's lease, if any)

To allocate labels L: if `value/L` names n and `id/n` holds L, the answer is n. Otherwise take
the next candidate n in this cluster's range and `create(id/n, L)`; losing that race means n
is someone else's, so try n+1. Having won n, `create(value/L, n)`; losing *that* race means another
allocator published a number for L first, so give n back (compare-and-delete `id/n`) and use
theirs. Since every claim is a `create`, two allocators sharing a store, in one process or many,
can never give one number to two label sets, and the same labels find the same number after a
restart.

Candidates start after the highest number in use and wrap around to the start of the range only
when the end is reached, so a number that was freed is not handed out again soon. The allocator
probes numbers one by one from a cursor; after a few failed claims in a row, or at the end of the
range, it lists the range once and jumps to the next free number.

Reference counting: the allocator counts `allocate` calls minus `release` calls per number, in
memory. The first reference writes `ref/<n>/<owner>`, the last release deletes it. `gc()` deletes
global identities that no owner references. `drop_stale_refs()` deletes this owner's references
left over from a previous run (without a lease they would pin identities forever): call it once
the agent has re-allocated identities for every workload it still runs.

GC races with allocation: an allocator may find `value/L`, and GC may delete it before the
allocator writes its reference. `allocate` therefore re-checks after writing its reference and
heals: it re-creates missing keys if it can, and otherwise starts again. Cilium accepts the same
window; keep GC rare (minutes) and run it from one place.

Local identities (CIDR peers, `cidr:<prefix>` + `reserved:world`, numbers with the 1<<24 flag)
follow Cilium: they mean something on one node only, so they are never shared or referenced by
other nodes. They still live in the store, under `local/<owner>/id/<n>` and
`local/<owner>/value/<labels>`, so that the numbers already written into pinned BPF maps stay the
same after an agent restart (DESIGN decision 7). Their last release deletes them. Other nodes'
identities from their labels (`reserved:remote-node` + `node:<key>` labels + the cluster label,
Cilium's remote-node scope, numbers with the 2<<24 flag) are local the same way, under
`local/<owner>/node/id/<n>` and `local/<owner>/node/value/<labels>`.

Thread safety: one allocator may be used from many threads.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from l7gate.identity.ipcache import IPNetwork, parse_prefix
from l7gate.identity.numeric import (
    LOCAL_MAX,
    LOCAL_MIN,
    REMOTE_NODE_MAX,
    REMOTE_NODE_MIN,
    RESERVED,
    Identity,
    IdentityError,
    allocation_range,
    check_cluster_id,
    is_local,
    is_remote_node_scoped,
    is_reserved,
    reserved_for_labels,
)
from l7gate.kvstore.api import KVStore
from l7gate.identity.filter import is_node_labels
from l7gate.policy.labels import CIDR_SOURCE, Labels, reserved
from l7gate.policy.selector import cidr_label

PREFIX = "l7gate/identities/v1/"
_CIDR_KEY_PREFIX = CIDR_SOURCE + ":"
# An allocation that keeps losing races this often is a bug or a pathological store.
_MAX_ATTEMPTS = 1000
# Failed claims in a row after which the allocator lists the range instead of probing on.
MAX_MISSES = 8

# -- the one encode/decode pair for labels in the store --------------------------------------

_ESCAPES = {"%": "%25", ";": "%3B", "=": "%3D"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "%":
            code = text[i + 1 : i + 3]
            if len(code) != 2 or not all(c in "0123456789abcdefABCDEF" for c in code):
                raise IdentityError(f"bad escape in stored labels: {text!r}")
            out.append(chr(int(code, 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def encode_labels(labels: Labels) -> str:
    """Canonical text of a label set: `key=value` pairs, sorted, joined by `;`, with `%`, `;`
    and `=` percent-escaped. Equal label sets give equal text, and it decodes back exactly."""
    return ";".join(f"{_escape(k)}={_escape(v)}" for k, v in labels.items_)


def decode_labels(text: str) -> Labels:
    if not text:
        return Labels()
    pairs: list[tuple[str, str]] = []
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise IdentityError(f"corrupt stored labels: {text!r}")
        pairs.append((_unescape(key), _unescape(value)))
    labels = Labels.of(pairs)
    if encode_labels(labels) != text:
        raise IdentityError(f"stored labels are not canonical: {text!r}")
    return labels


# -- CIDR identities --------------------------------------------------------------------------


def cidr_labels(prefix: str | IPNetwork) -> Labels:
    """The labels of the local identity for a CIDR: `cidr:<prefix>` and `reserved:world`.

    Only the prefix itself is a label (Cilium once added a label for every enclosing prefix);
    a `fromCIDR`/`toCIDR` selector selects a CIDR identity when its prefix lies within the
    selector's, which is the policy engine's job."""
    # the policy engine's spelling of the label, so that its CIDR selectors read it back
    return Labels.of({cidr_label(parse_prefix(prefix)): "", reserved("world"): ""})


def is_cidr_labels(labels: Labels) -> bool:
    return any(k.startswith(_CIDR_KEY_PREFIX) for k in labels)


FQDN_KEY_PREFIX = "fqdn:"  # policy.fqdn.FQDN_LABEL_PREFIX: the selectors an address was learned for


def fqdn_cidr_labels(prefix: str | IPNetwork, selector_keys: Iterable[str]) -> Labels:
    """The labels of the local identity of an address learned from DNS answers (`toFQDNs`):
    its CIDR labels and one `fqdn:<selector>` label per selector matching a name it answered
    for (Cilium's FQDN identities)."""
    labels = dict(cidr_labels(prefix).items())
    for key in selector_keys:
        if not key.startswith(FQDN_KEY_PREFIX):
            raise IdentityError(f"FQDN selector label {key!r} must start with {FQDN_KEY_PREFIX!r}")
        labels[key] = ""
    return Labels.of(labels)


def _plain_cidr_labels(labels: Labels) -> Labels:
    return Labels.of({k: v for k, v in labels.items() if not k.startswith(FQDN_KEY_PREFIX)})


# -- the allocator ----------------------------------------------------------------------------


class NumberCursor:
    """Where an allocator tries its next number in `numbers`, shared by every allocator that
    claims numbers with `create` in a store (this one and the cluster mesh's).

    Probing number by number is cheap while the numbers ahead are free; once they are not
    (another allocator is ahead of us, or we wrapped into a dense range), one listing of the
    numbers taken finds the next free one instead of thousands of failed creates. Not
    thread-safe: the allocator's lock guards it."""

    __slots__ = ("numbers", "cursor", "misses")

    def __init__(self, numbers: range) -> None:
        self.numbers = numbers
        self.cursor: int | None = None
        self.misses = 0  # failed claims in a row

    def next(self, taken: Callable[[], Iterable[int]]) -> int:
        """The next number to try; `taken` lists the numbers in use, when a listing is due."""
        numbers = self.numbers
        if self.cursor is None or self.cursor >= numbers.stop or self.misses >= MAX_MISSES:
            self.misses = 0
            used = set(taken())
            if self.cursor is None:
                # after the highest in use: freed numbers rest a while
                start = max(used) + 1 if used else numbers.start
            elif self.cursor >= numbers.stop:
                start = numbers.start
            else:
                start = self.cursor
            free = next((n for n in range(start, numbers.stop) if n not in used), None)
            if free is None:
                free = next((n for n in range(numbers.start, start) if n not in used), None)
            if free is None:
                raise IdentityError(
                    f"identity range {numbers.start}..{numbers.stop - 1} is exhausted"
                )
            self.cursor = free
        number = self.cursor
        self.cursor += 1
        return number

    def claimed(self, ok: bool) -> None:
        """Report whether the number `next` gave was claimed (a miss counts toward a listing)."""
        self.misses = 0 if ok else self.misses + 1


@dataclass(slots=True)
class _Space:
    """One number space in the store: the cluster's global range or this node's local range."""

    id_prefix: str
    value_prefix: str
    numbers: range
    candidates: NumberCursor = field(init=False)
    held: dict[int, int] = field(default_factory=dict)  # number -> reference count
    # The labels of each number held (set when it is first held; a number is only trusted for
    # labels while it is held for those very labels): another reference to labels already held
    # costs no store read.
    held_labels: dict[int, Labels] = field(default_factory=dict)
    number_of: dict[Labels, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.candidates = NumberCursor(self.numbers)

    def id_key(self, number: int) -> str:
        return f"{self.id_prefix}{number}"

    def value_key(self, canonical: str) -> str:
        return f"{self.value_prefix}{canonical}"


class IdentityAllocator:
    """Allocates numeric identities for label sets, in one cluster's range, in a kvstore.

    `owner` names this allocator's node in reference keys and local-identity keys; `lease`, if
    given, is attached to its reference keys so that they vanish when the node does. The
    allocator does not own the store. Thread-safe."""

    def __init__(
        self,
        store: KVStore,
        *,
        cluster_id: int = 0,
        owner: str = "local",
        lease: int | None = None,
        prefix: str = PREFIX,
    ) -> None:
        self.cluster_id = check_cluster_id(cluster_id)
        if not owner or "/" in owner:
            raise IdentityError(f"owner must be a non-empty name without '/', got {owner!r}")
        self.owner = owner
        self._store = store
        self._lease = lease
        self._prefix = prefix
        self._lock = threading.RLock()
        self._global = _Space(f"{prefix}id/", f"{prefix}value/", allocation_range(cluster_id))
        local = f"{prefix}local/{owner}/"
        self._local = _Space(f"{local}id/", f"{local}value/", range(LOCAL_MIN, LOCAL_MAX + 1))
        self._nodes = _Space(f"{local}node/id/", f"{local}node/value/", range(REMOTE_NODE_MIN, REMOTE_NODE_MAX + 1))

    def _space_of(self, number: int) -> _Space:
        if is_remote_node_scoped(number):
            return self._nodes
        return self._local if is_local(number) else self._global

    def _space_for(self, labels: Labels) -> _Space:
        if is_cidr_labels(labels):
            return self._local
        return self._nodes if is_node_labels(labels) else self._global

    # -- allocation ---------------------------------------------------------------------------

    def allocate(self, labels: Labels | Mapping[str, str]) -> Identity:
        """The identity for `labels`, allocating a number if they have none, and one more
        reference to it. Reserved label sets give their reserved identity (not counted);
        CIDR label sets give a local identity, another node's labels (`node_labels`) one in the
        remote-node scope."""
        labels = as_labels(labels)
        if _is_plain(labels):  # the usual case, a pod's labels: checked once per label set
            with self._lock:
                number = self._acquire(self._global, labels)
            return Identity(number, labels)
        if not labels:
            raise IdentityError("cannot allocate an identity for an empty label set")
        found = reserved_for_labels(labels)
        if found is not None:
            return found
        if is_cidr_labels(labels):
            if _plain_cidr_labels(labels) != cidr_labels(_cidr_prefix_of(labels)) or any(
                    v for k, v in labels.items() if k.startswith(FQDN_KEY_PREFIX)):
                raise IdentityError(f"CIDR identity labels must be exactly {_cidr_hint(labels)}, with fqdn: "
                                    f"selector labels (empty values) at most")
            space = self._local
        elif is_node_labels(labels):
            space = self._nodes
        elif labels.is_reserved():
            raise IdentityError(f"labels {labels} hold a reserved label but are not reserved")
        else:
            space = self._global
        with self._lock:
            number = self._acquire(space, labels)
        return Identity(number, labels)

    def allocate_cidr(self, prefix: str | IPNetwork) -> Identity:
        """The local identity for a CIDR peer, with one more reference."""
        return self.allocate(cidr_labels(prefix))

    def release(self, identity: Identity | int) -> bool:
        """Drop one reference. True when it was the last one this allocator held; then a local
        identity is deleted at once and a global one becomes collectable by `gc`."""
        number = identity.id if isinstance(identity, Identity) else identity
        if is_reserved(number):
            return False
        space = self._space_of(number)
        with self._lock:
            count = space.held.get(number, 0)
            if count == 0:
                raise IdentityError(f"identity {number} is not held by this allocator")
            if count > 1:
                space.held[number] = count - 1
                return False
            del space.held[number]
            gone = space.held_labels.pop(number, None)
            if gone is not None and space.number_of.get(gone) == number:
                del space.number_of[gone]
            if space is self._global:
                self._store.delete(self._ref_key(number))
            else:
                self._delete_identity(space, number)
            return True

    def _ref_key(self, number: int) -> str:
        return f"{self._prefix}ref/{number}/{self.owner}"

    def _acquire(self, space: _Space, labels: Labels) -> int:
        number = space.number_of.get(labels)
        if number is not None and space.held.get(number, 0) > 0 and space.held_labels.get(number) == labels:
            space.held[number] += 1
            return number
        canonical = encode_labels(labels)
        for _ in range(_MAX_ATTEMPTS):
            number = self._find_or_claim(space, labels, canonical)
            if number is None:
                continue
            if space.held.get(number, 0) > 0:
                space.held[number] += 1
                return number
            if space is self._global:
                self._store.put(self._ref_key(number), b"", lease=self._lease)
                # GC may have removed the identity between finding it and referencing it.
                if not self._still_valid(space, number, canonical):
                    self._store.delete(self._ref_key(number))
                    continue
            space.held[number] = 1
            space.held_labels[number] = labels
            space.number_of[labels] = number
            return number
        raise IdentityError(f"could not allocate an identity for {labels}: too much contention")

    def _still_valid(self, space: _Space, number: int, canonical: str) -> bool:
        data = canonical.encode()
        held = self._store.get(space.id_key(number))
        if held is None and not self._store.create(space.id_key(number), data):
            return False
        if held is not None and held != data:
            return False
        stored = self._store.get(space.value_key(canonical))
        if stored is None:
            return self._store.create(space.value_key(canonical), str(number).encode())
        return stored == str(number).encode()

    def _find_or_claim(self, space: _Space, labels: Labels, canonical: str) -> int | None:
        """The number for `labels`: found, or newly claimed. None means "lost a race, retry"."""
        store = self._store
        data = canonical.encode()
        value_key = space.value_key(canonical)
        stored = store.get(value_key)
        if stored is not None:
            number = _parse_number(stored, value_key)
            held = store.get(space.id_key(number))
            if held == data:
                return number
            if held is None and store.create(space.id_key(number), data):
                return number  # healed an index entry whose number had been collected
            # The index points at a number now owned by other labels: drop the stale entry.
            store.delete(value_key, prev_value=stored)
            return None
        number = space.candidates.next(lambda: self._numbers_in(space))
        claimed = store.create(space.id_key(number), data)
        space.candidates.claimed(claimed)
        if not claimed:
            return None
        if store.create(value_key, str(number).encode()):
            return number
        # Another allocator published a number for these labels first: give ours back.
        store.delete(space.id_key(number), prev_value=data)
        return None

    def _numbers_in(self, space: _Space) -> Iterator[int]:
        for key, _ in self._store.list_prefix(space.id_prefix):
            suffix = key[len(space.id_prefix) :]
            if suffix.isdigit() and int(suffix) in space.numbers:
                yield int(suffix)

    def _delete_identity(self, space: _Space, number: int) -> None:
        data = self._store.get(space.id_key(number))
        if data is None:
            return
        self._store.delete(space.value_key(data.decode()), prev_value=str(number).encode())
        self._store.delete(space.id_key(number), prev_value=data)

    # -- garbage collection -------------------------------------------------------------------

    def gc(self) -> list[int]:
        """Delete global identities no owner references, and this owner's local identities it
        does not hold. Returns the deleted numbers, sorted."""
        removed: list[int] = []
        with self._lock:
            referenced = set(self.held())
            for key, _ in self._store.list_prefix(f"{self._prefix}ref/"):
                digits = key[len(self._prefix) + len("ref/") :].split("/", 1)[0]
                if digits.isdigit():
                    referenced.add(int(digits))
            for space in (self._global, self._local, self._nodes):
                for number in sorted(self._numbers_in(space)):
                    if number not in referenced:
                        self._delete_identity(space, number)
                        removed.append(number)
        return sorted(removed)

    def drop_stale_refs(self) -> list[int]:
        """Delete this owner's reference keys for numbers it does not hold now (left over from
        a previous run). Returns those numbers, sorted."""
        dropped: list[int] = []
        with self._lock:
            held = set(self._global.held)
            prefix = f"{self._prefix}ref/"
            for key, _ in self._store.list_prefix(prefix):
                number, _, owner = key[len(prefix) :].partition("/")
                if owner == self.owner and number.isdigit() and int(number) not in held:
                    self._store.delete(key)
                    dropped.append(int(number))
        return sorted(dropped)

    def held(self) -> dict[int, int]:
        """Reference counts of the identities this allocator holds (a copy)."""
        with self._lock:
            return {**self._global.held, **self._local.held, **self._nodes.held}

    # -- lookups ------------------------------------------------------------------------------

    def lookup_by_id(self, number: int) -> Identity | None:
        """The identity with this number: reserved, global in the store, or this node's local."""
        if number in RESERVED:
            return RESERVED[number]
        space = self._space_of(number)
        data = self._store.get(space.id_key(number))
        if data is None:
            return None
        return Identity(number, decode_labels(data.decode()))

    def lookup_by_labels(self, labels: Labels | Mapping[str, str]) -> Identity | None:
        """The identity already allocated for `labels`, without allocating or referencing."""
        labels = as_labels(labels)
        found = reserved_for_labels(labels)
        if found is not None:
            return found
        space = self._space_for(labels)
        canonical = encode_labels(labels)
        stored = self._store.get(space.value_key(canonical))
        if stored is None:
            return None
        number = _parse_number(stored, space.value_key(canonical))
        if self._store.get(space.id_key(number)) != canonical.encode():
            return None  # a stale index entry
        return Identity(number, labels)

    def all(self) -> list[Identity]:
        """Every identity: reserved, global ones in the store, and this node's local ones,
        sorted by number."""
        result = list(RESERVED.values())
        for space in (self._global, self._local, self._nodes):
            for key, data in self._store.list_prefix(space.id_prefix):
                suffix = key[len(space.id_prefix) :]
                if suffix.isdigit():
                    result.append(Identity(int(suffix), decode_labels(data.decode())))
        return sorted(result, key=lambda i: i.id)


@functools.lru_cache(maxsize=65536)
def _is_plain(labels: Labels) -> bool:
    """Whether `allocate` gives `labels` a number in the global space: a non-empty label set
    that is not a reserved identity's, a CIDR's or a node's, and holds no reserved label."""
    return (bool(labels) and reserved_for_labels(labels) is None and not is_cidr_labels(labels)
            and not is_node_labels(labels) and not labels.is_reserved())


def as_labels(labels: Labels | Mapping[str, str]) -> Labels:
    return labels if isinstance(labels, Labels) else Labels.of(labels)


def _parse_number(data: bytes, key: str) -> int:
    text = data.decode(errors="replace")
    if not text.isdigit():
        raise IdentityError(f"corrupt identity number at {key}: {text!r}")
    return int(text)


def _cidr_prefix_of(labels: Labels) -> str:
    keys = [k for k in labels if k.startswith(_CIDR_KEY_PREFIX)]
    if len(keys) != 1:
        raise IdentityError(f"CIDR identity labels need exactly one cidr: label, got {labels}")
    return keys[0][len(_CIDR_KEY_PREFIX) :]


def _cidr_hint(labels: Labels) -> str:
    try:
        return str(cidr_labels(_cidr_prefix_of(labels)))
    except IdentityError:
        return "cidr:<prefix>,reserved:world"
