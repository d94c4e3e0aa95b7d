/* l7gate kernel datapath: L3/L4 verdicts and redirect of L7-policied connections to Envoy.
 *
 * Programs (tc, direct action):
 *   l7g_from_pod   ingress of a pod's host-side veth: packets a local pod sends
 *   l7g_from_link  ingress of an inter-node link: packets from pods on other nodes
 *   l7g_to_pod     egress of a pod's host-side veth: records host-originated flows in conntrack
 *
 * For a new flow (no conntrack entry either way) the verdict is:
 *   egress policy of the source endpoint (if local), then ingress policy of the destination
 *   endpoint (if local): deny wins; "redirect" marks the packet so that policy routing
 *   delivers it locally, to Envoy's transparent listener on <pod ip>:<port>.
 * The policy map is an LPM trie keyed by (endpoint, direction, protocol, peer, port prefix);
 * the agent writes one entry per port block with the merged decision, for each named peer and
 * for ANY (peer 0), so one or two lookups decide. No entry at all means the endpoint's policy
 * is not computed yet: drop (fail closed). Unknown addresses are `world` (identity 2).
 * Every drop is reported through the perf buffer `events`.
 *
 * ICMP is judged by its type, which sits in the port field of the policy key (as in Cilium).
 * An echo request is judged every time and recorded in conntrack by its identifier; its echo
 * reply passes as the reply of that entry. A request is never taken for a reply (an echo
 * request with the identifier of one going the other way is judged on its own: the bypass of
 * GHSA-c66w-hq56-4q97). Other ICMP messages are judged one by one and not recorded.
 *
 * Map layouts are mirrored in maps.py (one encode/decode pair per map).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#include "shared.h"  /* struct ct_key, ct_value; PROXY_UPSTREAM_MARK, MARK_MASK */

#define PIN(name) L7G_PIN_DIR "/" #name

#define WORLD_ID 2
#define DIR_INGRESS 0
#define DIR_EGRESS 1

#define ACT_ALLOW 1
#define ACT_DENY 2
#define ACT_REDIRECT 3
#define FLAG_AUTH 1
#define FLAG_AUTH_FAIL 2
#define FLAG_TUNNEL 4  /* auth-required HTTP from another node must arrive through the mTLS tunnel */
#define FLAG_DNS 8     /* egress DNS rules: to the node's DNS proxy, the query's destination kept */

#define REASON_POLICY 1
#define REASON_NO_POLICY 2
#define REASON_AUTH 3
#define REASON_UNKNOWN_ENDPOINT 4
#define REASON_UNSUPPORTED 5
#define REASON_PLAINTEXT 6
#define REASON_NO_PROXY 7        /* egress HTTP rules: the node's egress proxy is not listening */
#define REASON_TUPLE_IN_USE 8    /* the 4-tuple is an egress proxy upstream connection's (below) */

#define REDIRECT_MARK 0x200

/* Egress HTTP rules: a local pod's connection goes to the node's egress proxy listening on
 * 127.0.0.1:L7G_EGRESS_PROXY_PORT (assigned to its socket, the destination kept); 0: none. */
#ifndef L7G_EGRESS_PROXY_PORT
#define L7G_EGRESS_PROXY_PORT 0
#endif
#define LOOPBACK_ADDR 0x7f000001

struct ipcache_key {
    u32 prefixlen;
    u32 addr;
};
struct ipcache_value {
    u32 identity;
};

struct endpoint_value {
    u32 identity;
    u32 flags;
};

struct policy_key {
    u32 prefixlen;
    u32 endpoint;
    u8 direction;
    u8 proto;
    u32 peer;
    u16 port;  /* network byte order: prefixes cover the high bits first */
} __attribute__((packed));
struct policy_value {
    u8 action;
    u8 flags;
    u16 pad;
};

struct auth_key {
    u32 local_id;
    u32 remote_id;
    u32 remote_node;  /* the remote pod's node address (l7g_nodes), as the packet reads it */
    u8 auth_type;
    u8 pad[3];
};
struct auth_value {
    u64 expires_ns;  /* bpf_ktime_get_boot_ns() clock */
};

/* Source side of the Envoy-to-Envoy mTLS tunnel: a local pod of identity src_id opening a TCP
 * connection to a remote endpoint of identity dst_id on port goes to this node's Envoy (its
 * egress listener on the remote ip:port), which carries it to the destination node over mTLS. */
struct tunnel_key {
    u32 src_id;
    u32 dst_id;
    u16 port;  /* network byte order */
    u8 proto;
    u8 pad;
};

struct meta_value {
    u64 magic;
    u32 layout;
    u32 pad;
};

struct drop_event {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 reason;
    u8 direction;
    u8 pad;
    u32 src_id;
    u32 dst_id;
    u32 endpoint;
    u32 ifindex;
    u8 icmp_type;  /* proto 1: the ICMP type and code (sport is 0, dport the type) */
    u8 icmp_code;
    u16 pad2;
};

BPF_TABLE_PINNED("array", u32, struct meta_value, l7g_meta, 1, PIN(meta));
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, l7g_ipcache, 65536, PIN(ipcache), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u32, struct endpoint_value, l7g_endpoints, 4096, PIN(endpoints));
BPF_TABLE_PINNED("hash", u32, u32, l7g_nodes, 65536, PIN(nodes));  /* pod address -> its node's address */
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, l7g_policy, 262144, PIN(policy), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct auth_key, struct auth_value, l7g_auth, 65536, PIN(auth));
BPF_TABLE_PINNED("hash", struct tunnel_key, u32, l7g_tunnel, 65536, PIN(tunnel));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, l7g_ct, 262144, PIN(ct));
BPF_PERF_OUTPUT(l7g_events);

static __always_inline u32 identity_of(u32 addr)
{
    struct ipcache_key k = {.prefixlen = 32, .addr = addr};
    struct ipcache_value *v = l7g_ipcache.lookup(&k);
    return v ? v->identity : WORLD_ID;
}

/* The decision of one endpoint's policy, one direction, for (peer, proto, port). */
static __always_inline struct policy_value *policy_lookup(u32 endpoint, u8 dir, u8 proto, u32 peer, u16 port)
{
    struct policy_key k = {};
    k.prefixlen = 96;
    k.endpoint = endpoint;
    k.direction = dir;
    k.proto = proto;
    k.peer = peer;
    k.port = port;
    struct policy_value *v = l7g_policy.lookup(&k);
    if (v)
        return v;
    k.peer = 0;
    return l7g_policy.lookup(&k);
}

/* Mutual auth is proven per (local identity, remote identity, remote node): a node that did
 * not prove the remote identity is not let in on another node's proof. */
static __always_inline int authenticated(u32 local_id, u32 remote_id, u32 remote_addr)
{
    struct auth_key k = {};
    k.local_id = local_id;
    k.remote_id = remote_id;
    u32 *node = l7g_nodes.lookup(&remote_addr);
    if (!node)
        return 0;
    k.remote_node = *node;
    k.auth_type = 1;
    struct auth_value *v = l7g_auth.lookup(&k);
    if (!v)
        return 0;
    return v->expires_ns > bpf_ktime_get_boot_ns();
}

static __always_inline int tunnelled(u32 src_id, u32 dst_id, u8 proto, u16 port)
{
    struct tunnel_key k = {};
    k.src_id = src_id;
    k.dst_id = dst_id;
    k.port = port;
    k.proto = proto;
    return l7g_tunnel.lookup(&k) != 0;
}

struct flow {
    u32 saddr, daddr;
    u16 sport, dport;        /* network byte order; dport is what policy judges (ICMP: the type) */
    u16 ct_sport, ct_dport;  /* conntrack's view: the ports; ICMP echo: the identifier, see parse */
    u8 proto;
    u8 opens;                /* opens a flow (TCP SYN, ICMP requests): judged again, never a reply */
    u8 track;                /* an allowed new flow gets a conntrack entry */
    u8 icmp_type;
    u8 icmp_code;
};

#define PARSE_PASS 0      /* not IPv4 or IPv6 (ARP and the like): not ours to judge */
#define PARSE_OK 1
#define PARSE_SHORT 2     /* headers not in the linear part: pull and parse again */
#define PARSE_DROP 3      /* IPv6, a non-first fragment, a malformed header: fail closed */

static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return PARSE_SHORT;
    if (eth->h_proto == htons(ETH_P_IPV6))
        return PARSE_DROP;  /* IPv6 is not enforced by this datapath: refuse it */
    if (eth->h_proto != htons(ETH_P_IP))
        return PARSE_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return PARSE_SHORT;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    f->sport = 0;
    f->dport = 0;
    f->ct_sport = 0;
    f->ct_dport = 0;
    f->opens = 0;
    f->track = 1;
    f->icmp_type = 0;
    f->icmp_code = 0;
    if (ip->frag_off & htons(0x1fff))
        return PARSE_DROP;  /* a later fragment carries no ports to judge */
    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return PARSE_DROP;
    void *l4 = (void *)ip + ihl;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return PARSE_SHORT;
        f->sport = tcp->source;
        f->dport = tcp->dest;
        f->opens = tcp->syn && !tcp->ack;
    } else if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
        struct udphdr *udp = l4;  /* SCTP's common header starts with the same two ports */
        if ((void *)(udp + 1) > end)
            return PARSE_SHORT;
        f->sport = udp->source;
        f->dport = udp->dest;
    } else if (ip->protocol == IPPROTO_ICMP) {
        struct icmphdr *icmp = l4;
        if ((void *)(icmp + 1) > end)
            return PARSE_SHORT;
        f->icmp_type = icmp->type;
        f->icmp_code = icmp->code;
        f->dport = htons(icmp->type);
        if (icmp->type == ICMP_ECHO) {
            /* conntrack (saddr, daddr, id, 0); its reply's reverse key is the same */
            f->ct_sport = icmp->un.echo.id;
            f->opens = 1;
        } else if (icmp->type == ICMP_ECHOREPLY) {
            f->ct_dport = icmp->un.echo.id;
            f->track = 0;
        } else {
            f->opens = 1;
            f->track = 0;
        }
        return PARSE_OK;
    }
    f->ct_sport = f->sport;
    f->ct_dport = f->dport;
    return PARSE_OK;
}

static __always_inline int parse_pulled(struct __sk_buff *skb, struct flow *f)
{
    int r = parse(skb, f);
    if (r != PARSE_SHORT)
        return r;
    if (bpf_skb_pull_data(skb, 0) < 0)
        return PARSE_DROP;
    r = parse(skb, f);
    return r == PARSE_SHORT ? PARSE_DROP : r;
}

static __always_inline int drop(struct __sk_buff *skb, struct flow *f, u8 reason, u8 dir, u32 src_id, u32 dst_id, u32 ep)
{
    struct drop_event e = {};
    e.saddr = f->saddr;
    e.daddr = f->daddr;
    e.sport = f->sport;
    e.dport = f->dport;
    e.proto = f->proto;
    e.reason = reason;
    e.direction = dir;
    e.src_id = src_id;
    e.dst_id = dst_id;
    e.endpoint = ep;
    e.ifindex = skb->ifindex;
    e.icmp_type = f->icmp_type;
    e.icmp_code = f->icmp_code;
    l7g_events.perf_submit(skb, &e, sizeof(e));
    return TC_ACT_SHOT;
}

/* The verdict policy gives a flow, without side effects: 0 drop (with *reason, *dir, *ep),
 * 1 pass, 2 redirect to the proxy (local delivery), 3 to the egress proxy (egress HTTP rules).
 * The source's egress is checked when it is a local endpoint;
 * `src_must_be_local` makes an unknown source a drop (packets from a pod's own veth). */
static __always_inline int judge(struct flow *f, int src_must_be_local, u32 *src_id, u32 *dst_id,
                                 u8 *reason, u8 *dir, u32 *ep)
{
    *src_id = identity_of(f->saddr);
    *dst_id = identity_of(f->daddr);
    int redirect = 0, egress_proxy = 0;
    struct endpoint_value *src_ep = l7g_endpoints.lookup(&f->saddr);
    if (!src_ep && src_must_be_local) {
        *reason = REASON_UNKNOWN_ENDPOINT; *dir = DIR_EGRESS; *ep = 0;
        return 0;
    }
    struct endpoint_value *dst_ep = l7g_endpoints.lookup(&f->daddr);
    int tunnel = 0;
    if (src_ep) {
        *src_id = src_ep->identity;
        /* To another node under an auth-required HTTP rule: through this node's Envoy, over
         * mTLS to the destination node's Envoy, which authenticates the pair by certificate. */
        tunnel = !dst_ep && tunnelled(*src_id, *dst_id, f->proto, f->dport);
        struct policy_value *v = policy_lookup(*src_id, DIR_EGRESS, f->proto, *dst_id, f->dport);
        *dir = DIR_EGRESS; *ep = *src_id;
        if (!v) { *reason = REASON_NO_POLICY; return 0; }
        if (v->action == ACT_DENY) { *reason = (v->flags & FLAG_AUTH_FAIL) ? REASON_AUTH : REASON_POLICY; return 0; }
        if ((v->flags & FLAG_AUTH) && !tunnel && !authenticated(*src_id, *dst_id, f->daddr)) { *reason = REASON_AUTH; return 0; }
        /* Egress DNS rules: the query goes to the node's DNS proxy (marked like any redirect,
         * delivered locally with its destination kept). Egress HTTP rules: the connection goes
         * to the node's egress proxy, which applies them (and a local destination's ingress
         * HTTP rules) and connects from the pod's own address. */
        if (v->action == ACT_REDIRECT) {
            /* Through the tunnel, its egress listener on this node applies the pod's egress
             * HTTP rules before it encrypts (the redirect below). */
            if (v->flags & FLAG_DNS)
                redirect = 1;
            else if (!tunnel)
                egress_proxy = 1;
        }
        if (tunnel)
            redirect = 1;
    }
    if (dst_ep) {
        *dst_id = dst_ep->identity;
        struct policy_value *v = policy_lookup(*dst_id, DIR_INGRESS, f->proto, *src_id, f->dport);
        *dir = DIR_INGRESS; *ep = *dst_id;
        if (!v) { *reason = REASON_NO_POLICY; return 0; }
        if (v->action == ACT_DENY) { *reason = (v->flags & FLAG_AUTH_FAIL) ? REASON_AUTH : REASON_POLICY; return 0; }
        /* From another node, this must have come through the tunnel (as the destination
         * node's Envoy, host-originated): plaintext is refused even with a valid auth entry. */
        if ((v->flags & FLAG_TUNNEL) && !src_ep) { *reason = REASON_PLAINTEXT; return 0; }
        if ((v->flags & FLAG_AUTH) && !authenticated(*dst_id, *src_id, f->saddr)) { *reason = REASON_AUTH; return 0; }
        if (v->action == ACT_REDIRECT)
            redirect = 1;
    }
    return egress_proxy ? 3 : redirect ? 2 : 1;
}

/* The first packet of a connection for the egress proxy: given to the proxy's listening
 * socket (its own established socket for a retransmission), so that the proxy accepts it with
 * the destination it was sent to. Negative when the proxy is not listening. */
static __always_inline int assign_egress_proxy(struct __sk_buff *skb, struct flow *f)
{
    if (L7G_EGRESS_PROXY_PORT == 0)
        return -1;
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = f->saddr;
    t.ipv4.daddr = f->daddr;
    t.ipv4.sport = f->sport;
    t.ipv4.dport = f->dport;
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk && sk->state == BPF_TCP_LISTEN) {
        bpf_sk_release(sk);  /* a listener on the destination itself (a local pod's ingress proxy) */
        sk = 0;
    }
    if (!sk) {
        t.ipv4.daddr = bpf_htonl(LOOPBACK_ADDR);
        t.ipv4.dport = bpf_htons(L7G_EGRESS_PROXY_PORT);
        sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
        if (!sk)
            return -1;
    }
    long r = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return r < 0 ? -1 : 0;
}

/* Whether a live socket of this (the node's) namespace, other than a listener or one in
 * TIME_WAIT, has local address
 * laddr:lport and remote raddr:rport (ports in network order).
 *
 * The egress proxy's upstream connections leave from the client pod's own address, from a port
 * the node's kernel picks, and the pod picks its own ports in its own namespace: the two could
 * hold one 4-tuple at once, and then the conntrack entry and the socket acceleration's key of one
 * would be taken for the other's. So neither may open while the other lives: a pod's SYN whose
 * 4-tuple an egress proxy upstream socket holds, and an egress proxy upstream SYN whose 4-tuple a
 * pod's connection to the proxy holds (the proxy's transparent socket of it), are dropped. */
static __always_inline int tuple_in_use(struct __sk_buff *skb, u32 laddr, u16 lport, u32 raddr, u16 rport)
{
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = raddr;  /* a packet arriving at that socket */
    t.ipv4.sport = rport;
    t.ipv4.daddr = laddr;
    t.ipv4.dport = lport;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    /* a TIME_WAIT socket holds no data path any more (and is common: an upstream connection the
     * proxy closed keeps its 4-tuple for a minute) */
    int busy = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT;
    bpf_sk_release(sk);
    return busy;
}

/* A flow with no conntrack entry either way. */
static __always_inline int new_flow(struct __sk_buff *skb, struct flow *f, int check_egress)
{
    u32 src_id = 0, dst_id = 0, ep = 0;
    u8 reason = 0, dir = 0;
    int v = judge(f, check_egress, &src_id, &dst_id, &reason, &dir, &ep);
    if (v == 0 && f->proto == IPPROTO_TCP && !f->opens) {
        /* Mid-stream TCP without a conntrack entry (evicted, or older than the program): a
         * reply of a connection the reverse direction's policy allows passes, and its entry
         * is restored. Forged mid-stream segments reach no socket of their own. */
        struct flow r = {.saddr = f->daddr, .daddr = f->saddr, .sport = f->dport, .dport = f->sport, .proto = f->proto};
        u32 r_src = 0, r_dst = 0, r_ep = 0;
        u8 r_reason = 0, r_dir = 0;
        if (judge(&r, 0, &r_src, &r_dst, &r_reason, &r_dir, &r_ep) == 1) {
            struct ct_key rk = {.saddr = r.saddr, .daddr = r.daddr, .sport = r.sport, .dport = r.dport, .proto = r.proto};
            struct ct_value rv = {.src_id = r_src};
            l7g_ct.update(&rk, &rv);
            return TC_ACT_OK;
        }
    }
    if (v == 0)
        return drop(skb, f, reason, dir, src_id, dst_id, ep);
    if (v == 3) {
        if (f->proto != IPPROTO_TCP)
            return drop(skb, f, REASON_POLICY, DIR_EGRESS, src_id, dst_id, src_id);
        if (f->opens && assign_egress_proxy(skb, f) < 0)
            return drop(skb, f, REASON_NO_PROXY, DIR_EGRESS, src_id, dst_id, src_id);
    }
    if (f->track) {
        struct ct_key ck = {.saddr = f->saddr, .daddr = f->daddr, .sport = f->ct_sport, .dport = f->ct_dport, .proto = f->proto};
        struct ct_value cv = {.redirect = v == 3 ? 2 : v == 2, .src_id = src_id};
        l7g_ct.update(&ck, &cv);
    }
    if (v >= 2)
        skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
    return TC_ACT_OK;
}

static __always_inline int handle(struct __sk_buff *skb, int check_egress)
{
    struct flow f = {};
    int p = parse_pulled(skb, &f);
    if (p == PARSE_PASS)
        return TC_ACT_OK;
    if (p == PARSE_DROP)
        return drop(skb, &f, REASON_UNSUPPORTED, check_egress ? DIR_EGRESS : DIR_INGRESS, 0, 0, 0);
    if (check_egress && f.proto == IPPROTO_TCP && f.opens && tuple_in_use(skb, f.saddr, f.sport, f.daddr, f.dport))
        return drop(skb, &f, REASON_TUPLE_IN_USE, DIR_EGRESS, identity_of(f.saddr), identity_of(f.daddr), identity_of(f.saddr));
    struct ct_key ck = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.ct_sport, .dport = f.ct_dport, .proto = f.proto};
    if (!f.opens) {
        struct ct_value *fwd = l7g_ct.lookup(&ck);
        if (fwd) {
            if (fwd->redirect)
                skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
            return TC_ACT_OK;
        }
        struct ct_key rk = {.saddr = f.daddr, .daddr = f.saddr, .sport = f.ct_dport, .dport = f.ct_sport, .proto = f.proto};
        struct ct_value *rev = l7g_ct.lookup(&rk);
        if (rev) {
            /* a reply; to the egress proxy's upstream socket (it has the pod's address) */
            if (rev->proxy_reply)
                skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
            return TC_ACT_OK;
        }
    }
    return new_flow(skb, &f, check_egress);
}

int l7g_from_pod(struct __sk_buff *skb)
{
    return handle(skb, 1);
}

int l7g_from_link(struct __sk_buff *skb)
{
    return handle(skb, 0);
}

/* Host-originated flows (Envoy's upstream connections, the node itself) are not filtered, but
 * recorded so that the pod's replies are recognised as replies. */
int l7g_to_pod(struct __sk_buff *skb)
{
    struct flow f = {};
    if (parse_pulled(skb, &f) != PARSE_OK || !f.opens || !f.track)
        return TC_ACT_OK;
    struct ct_key ck = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.ct_sport, .dport = f.ct_dport, .proto = f.proto};
    if ((skb->mark & MARK_MASK) == PROXY_UPSTREAM_MARK && f.proto == IPPROTO_TCP) {
        /* the egress proxy, from a local pod's address: not while a pod's connection holds the
         * 4-tuple (`tuple_in_use`); else its entry replaces what a closed connection left */
        if (tuple_in_use(skb, f.daddr, f.dport, f.saddr, f.sport))
            return drop(skb, &f, REASON_TUPLE_IN_USE, DIR_EGRESS, identity_of(f.saddr), identity_of(f.daddr),
                        identity_of(f.saddr));
        struct ct_value pv = {.host = 1, .proxy_reply = 1, .src_id = identity_of(f.saddr)};
        l7g_ct.update(&ck, &pv);
        return TC_ACT_OK;
    }
    if (l7g_ct.lookup(&ck))
        return TC_ACT_OK;
    struct ct_key rk = {.saddr = f.daddr, .daddr = f.saddr, .sport = f.ct_dport, .dport = f.ct_sport, .proto = f.proto};
    if (l7g_ct.lookup(&rk))
        return TC_ACT_OK;
    struct ct_value cv = {.host = 1, .src_id = 1};
    l7g_ct.update(&ck, &cv);
    return TC_ACT_OK;
}

/* The egress proxy's upstream connections leaving for another node carry a local pod's
 * address: recorded so that their replies, arriving on the link, go to the proxy's socket and
 * not to the pod. Nothing else leaving the node is looked at. */
int l7g_to_link(struct __sk_buff *skb)
{
    if ((skb->mark & MARK_MASK) != PROXY_UPSTREAM_MARK)
        return TC_ACT_OK;
    struct flow f = {};
    if (parse_pulled(skb, &f) != PARSE_OK || f.proto != IPPROTO_TCP || !f.opens)
        return TC_ACT_OK;
    if (tuple_in_use(skb, f.daddr, f.dport, f.saddr, f.sport))
        return drop(skb, &f, REASON_TUPLE_IN_USE, DIR_EGRESS, identity_of(f.saddr), identity_of(f.daddr),
                    identity_of(f.saddr));
    struct ct_key ck = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.ct_sport, .dport = f.ct_dport, .proto = f.proto};
    struct ct_value cv = {.host = 1, .proxy_reply = 1, .src_id = identity_of(f.saddr)};
    l7g_ct.update(&ck, &cv);
    return TC_ACT_OK;
}
