/* l7gate socket acceleration: established TCP sockets between a local pod and this node
 * (Envoy's transparent listener sockets, or another local pod) go into a sockhash; a message
 * sent on one is handed straight to the peer socket's receive queue, skipping the veth, tc
 * and routing. Only connections the tc programs already let through are established, so no
 * verdict is bypassed. When the peer socket is not in the map, the message takes the normal
 * path (SK_PASS): msg_redirect_hash would drop it.
 *
 *   l7g_sockops  cgroup sock_ops: adds established sockets with a local pod address on either end
 *   l7g_skmsg    sk_msg verdict on the sockhash: redirect to the peer, or pass
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

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
    struct sock_key k = {};
    k.sip = lip;
    k.dip = rip;
    k.sport = bpf_htons((u16)skops->local_port);
    k.dport = skops->remote_port >> 16;  /* network order, kept in the upper half */
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
