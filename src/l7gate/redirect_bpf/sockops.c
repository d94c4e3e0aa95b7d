/* l7gate socket acceleration: established TCP sockets between a local pod and this node
 * (Envoy's transparent listener sockets, or another local pod) go into a sockhash; a message
 * sent on one is handed straight to the peer socket's receive queue, skipping the veth, tc
 * and routing. Only connections the tc programs already let through are established, so no
 * verdict is bypassed. When the peer socket is not in the map, the message takes the normal
 * path (SK_PASS): msg_redirect_hash would drop it.
 *
 *   l7g_sockops  cgroup sock_ops: adds established sockets with a local pod address on either end
 *   l7g_skmsg    sk_msg verdict on the sockhash: redirect to the peer, or pass
 *
 * The sockhash is keyed by 4-tuple, which is unique only while no two sockets share one. The
 * egress proxy's upstream connections break that: they leave from the client pod's own address
 * (`original_src`) from a port the node's kernel picks, while the pod picks its ports in its own
 * namespace, so the pod can hold a connection (to the proxy, transparently) with the same
 * 4-tuple as the proxy's upstream connection to the destination. Keyed alike, the
 * destination's end of the upstream connection looked like the peer of the pod's socket, and
 * the pod's bytes were handed straight to the destination, past the proxy's HTTP rules. So the
 * egress proxy's upstream connections are never added, at either end: the datapath's conntrack
 * (`l7g_ct`, written by the tc programs before the handshake completes) marks them
 * `proxy_reply`, and the proxy's own sockets also carry PROXY_UPSTREAM_MARK.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <uapi/linux/in.h>

#include "shared.h"  /* datapath.c's conntrack entry and marks */

#define PIN(name) L7G_PIN_DIR "/" #name

struct sock_key {
    u32 sip;
    u32 dip;
    u32 sport;  /* network byte order, in the low 16 bits */
    u32 dport;
};

struct endpoint_value {
    u32 identity;
    u32 flags;
};

BPF_TABLE_PINNED("hash", u32, struct endpoint_value, l7g_endpoints, 4096, PIN(endpoints));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, l7g_ct, 262144, PIN(ct));
BPF_SOCKHASH(l7g_socks, struct sock_key, 65535);

int l7g_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET)
        return 0;
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 0;
    u32 lip = skops->local_ip4;
    u32 rip = skops->remote_ip4;
    if (!l7g_endpoints.lookup(&lip) && !l7g_endpoints.lookup(&rip))
        return 0;  /* not a pod's connection: leave it alone */
    struct bpf_sock *sk = skops->sk;
    if (sk && (sk->mark & MARK_MASK) == PROXY_UPSTREAM_MARK)
        return 0;  /* the egress proxy's upstream socket */
    u16 lport = bpf_htons((u16)skops->local_port);
    u16 rport = skops->remote_port >> 16;  /* network order, kept in the upper half */
    /* conntrack's key is the connection as its opener sent it */
    struct ct_key ck = {.proto = IPPROTO_TCP};
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        ck.saddr = lip;
        ck.daddr = rip;
        ck.sport = lport;
        ck.dport = rport;
    } else {
        ck.saddr = rip;
        ck.daddr = lip;
        ck.sport = rport;
        ck.dport = lport;
    }
    struct ct_value *cv = l7g_ct.lookup(&ck);
    if (cv && cv->proxy_reply)
        return 0;  /* either end of an egress proxy upstream connection */
    struct sock_key k = {};
    k.sip = lip;
    k.dip = rip;
    k.sport = lport;
    k.dport = rport;
    l7g_socks.sock_hash_update(skops, &k, BPF_NOEXIST);
    return 0;
}

int l7g_skmsg(struct sk_msg_md *msg)
{
    struct sock_key peer = {};
    peer.sip = msg->remote_ip4;
    peer.dip = msg->local_ip4;
    peer.sport = msg->remote_port >> 16;
    peer.dport = bpf_htons((u16)msg->local_port);
    l7g_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    return SK_PASS;  /* redirected when the peer is in the map; the normal path otherwise */
}
