/* l7gate socket load balancer: Kubernetes Services translated at the socket, as Cilium's
 * kube-proxy replacement does (bpf_sock.c), so that a pod connecting to a ClusterIP talks to a
 * backend pod from its very first packet and no NAT, conntrack entry or VIP ever reaches the
 * wire. Every later hook (tc policy, the L7 redirect, mutual auth, flows) sees the backend.
 * IPv4 only.
 *
 * Programs (cgroup v2, attached to the pods' cgroup):
 *   l7g_lb_connect4   connect(): TCP, connected UDP (and SCTP, where the kernel runs the hook)
 *   l7g_lb_sendmsg4   sendto()/sendmsg() with an address on an unconnected UDP socket
 *   l7g_lb_recvmsg4   recvfrom() on UDP: the reply's source, backend -> frontend
 *   l7g_lb_getpeer4   getpeername(): the peer the application dialled, backend -> frontend
 *
 * Forward: a destination (address, port, protocol) found in lb_services is a frontend. A
 * backend slot is chosen — TCP: bpf_get_prandom_u32() per connection; UDP: a hash of the
 * socket cookie, so one socket keeps talking to one backend while the backend set is unchanged
 * (Cilium's choice: a per-datagram choice scatters a socket's conversation) — and the
 * destination is rewritten. The reverse entry (socket cookie, backend) -> frontend is written
 * to the LRU map lb_reverse first, as Cilium's lb4_reverse_sk.
 * A frontend with no backends is refused: connect()/sendto() fail with EHOSTUNREACH, as in
 * Cilium (bpf_set_retval; a kernel without it would report EPERM). Nothing leaves the host.
 *
 * Reverse: (cookie, source address) found in lb_reverse, and its frontend still a service with
 * backends: the address is rewritten to the frontend. A stale entry is deleted, as Cilium does.
 *
 * Update scheme (written by lb.py; the programs only read lb_services and lb_backends):
 * a service's backends live under a service id that names one revision of its backend set.
 * A change writes the new set's slots under a fresh id, then switches the service entry to
 * (count, new id) in one map update, then deletes the old id's slots. So the count never
 * exceeds the slots written under the id it is read with, and a connect that looks the service
 * up after the switch cannot reach a removed backend. A connect that read the entry just before
 * the switch and finds its slot already deleted looks the service up once more.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#define PIN(name) L7G_PIN_DIR "/" #name

#define SYS_REJECT 0
#define SYS_PROCEED 1
#define L7G_EHOSTUNREACH 113
#define L7G_ENOMEM 12

#define XLATE_NONE 0     /* not a frontend: leave the address alone */
#define XLATE_DONE 1
#define XLATE_REFUSE 2   /* a frontend without a usable backend */
#define XLATE_NOMEM 3    /* the reverse entry could not be written */

/* bcc's own declaration truncates the cookie to 32 bits */
static u64 (*l7g_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

struct lb_service_key {
    u32 vip;
    u16 port;   /* network byte order */
    u8 proto;   /* IPPROTO_* */
    u8 pad;
};
struct lb_service {
    u32 count;  /* backends in slots 0..count-1 under id */
    u32 id;     /* this revision of the backend set; 0 when count is 0 */
};
union lb_service_snap {
    struct lb_service s;
    u64 raw;
};

struct lb_backend_key {
    u32 id;
    u32 slot;
};
struct lb_backend {
    u32 ip;
    u16 port;   /* network byte order */
    u16 pad;
};
union lb_backend_snap {
    struct lb_backend b;
    u64 raw;
};

struct lb_reverse_key {
    u64 cookie;
    u32 ip;     /* the backend */
    u16 port;   /* network byte order */
    u16 pad;
};
struct lb_reverse_value {
    u32 vip;
    u16 port;   /* network byte order */
    u16 pad;
};
union lb_reverse_snap {
    struct lb_reverse_value v;
    u64 raw;
};

struct meta_value {
    u64 magic;
    u32 layout;
    u32 pad;
};

BPF_TABLE_PINNED("array", u32, struct meta_value, l7g_meta, 1, PIN(meta));
/* Service maps take memory as they fill (preallocated, the two would hold ~26 MB from the
 * start); the LRU map has to be preallocated (~23 MB). */
BPF_TABLE_PINNED("hash", struct lb_service_key, struct lb_service, l7g_lb_services, 65536, PIN(lb_services), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_backend_key, struct lb_backend, l7g_lb_backends, 262144, PIN(lb_backends), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb_reverse_key, struct lb_reverse_value, l7g_lb_reverse, 262144, PIN(lb_reverse));

/* The context's port: a 4-byte load (narrower loads of user_port are refused on some
 * kernels), the port in network order in its low 16 bits. */
static __always_inline u16 ctx_port(struct bpf_sock_addr *ctx)
{
    volatile u32 port = ctx->user_port;
    return (u16)port;
}

static __always_inline u32 cookie_hash(u64 cookie)
{
    u32 h = (u32)(cookie ^ (cookie >> 32));
    h *= 0x9E3779B1u;
    return h ^ (h >> 16);
}

static __always_inline int xlate_fwd(struct bpf_sock_addr *ctx)
{
    struct lb_service_key key = {};
    key.vip = ctx->user_ip4;
    key.port = ctx_port(ctx);
    key.proto = (u8)ctx->protocol;

    struct lb_service *svc = l7g_lb_services.lookup(&key);
    if (!svc)
        return XLATE_NONE;

    u64 cookie = l7g_socket_cookie(ctx);
    u32 pick = key.proto == IPPROTO_TCP ? bpf_get_prandom_u32() : cookie_hash(cookie);
    union lb_backend_snap be = {};
    int found = 0;
#pragma unroll
    for (int attempt = 0; attempt < 2; attempt++) {
        if (attempt > 0) {
            /* the slot vanished: the entry was switched under us; read the new one */
            svc = l7g_lb_services.lookup(&key);
            if (!svc)
                return XLATE_NONE;  /* the service itself is gone */
        }
        union lb_service_snap s;
        s.raw = *(volatile u64 *)svc;  /* count and id from one load: never a torn pair */
        if (s.s.count == 0)
            return XLATE_REFUSE;
        struct lb_backend_key bk = {};
        bk.id = s.s.id;
        bk.slot = pick % s.s.count;
        struct lb_backend *b = l7g_lb_backends.lookup(&bk);
        if (b) {
            be.raw = *(volatile u64 *)b;
            found = 1;
            break;
        }
    }
    if (!found)
        return XLATE_REFUSE;

    struct lb_reverse_key rk = {};
    rk.cookie = cookie;
    rk.ip = be.b.ip;
    rk.port = be.b.port;
    struct lb_reverse_value rv = {};
    rv.vip = key.vip;
    rv.port = key.port;
    /* A TCP socket connects once: its entry is always new. A UDP socket sends many datagrams:
     * rewrite its entry only when it changes, so as not to churn the LRU (Cilium does this). */
    struct lb_reverse_value *old = key.proto == IPPROTO_TCP ? NULL : l7g_lb_reverse.lookup(&rk);
    if (!old || old->vip != rv.vip || old->port != rv.port) {
        if (l7g_lb_reverse.update(&rk, &rv) != 0)
            return XLATE_NOMEM;
    }

    ctx->user_ip4 = be.b.ip;
    ctx->user_port = (u32)be.b.port;
    return XLATE_DONE;
}

static __always_inline int fwd_verdict(struct bpf_sock_addr *ctx)
{
    switch (xlate_fwd(ctx)) {
    case XLATE_REFUSE:
        bpf_set_retval(-L7G_EHOSTUNREACH);
        return SYS_REJECT;
    case XLATE_NOMEM:
        bpf_set_retval(-L7G_ENOMEM);
        return SYS_REJECT;
    default:
        return SYS_PROCEED;
    }
}

static __always_inline void xlate_rev(struct bpf_sock_addr *ctx)
{
    struct lb_reverse_key rk = {};
    rk.cookie = l7g_socket_cookie(ctx);
    rk.ip = ctx->user_ip4;
    rk.port = ctx_port(ctx);
    struct lb_reverse_value *rv = l7g_lb_reverse.lookup(&rk);
    if (!rv)
        return;
    union lb_reverse_snap r;
    r.raw = *(volatile u64 *)rv;

    /* only while the frontend is still a service with backends (Cilium: else stale) */
    struct lb_service_key key = {};
    key.vip = r.v.vip;
    key.port = r.v.port;
    key.proto = (u8)ctx->protocol;
    struct lb_service *svc = l7g_lb_services.lookup(&key);
    if (!svc || svc->count == 0) {
        l7g_lb_reverse.delete(&rk);
        return;
    }
    ctx->user_ip4 = r.v.vip;
    ctx->user_port = (u32)r.v.port;
}

int l7g_lb_connect4(struct bpf_sock_addr *ctx)
{
    return fwd_verdict(ctx);
}

int l7g_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
    return fwd_verdict(ctx);
}

int l7g_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
    xlate_rev(ctx);
    return SYS_PROCEED;  /* recvmsg4 must return 1 */
}

int l7g_lb_getpeer4(struct bpf_sock_addr *ctx)
{
    xlate_rev(ctx);
    return SYS_PROCEED;  /* getpeername4 must return 1 */
}
