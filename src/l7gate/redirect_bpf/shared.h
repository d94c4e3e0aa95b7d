/* What the tc programs (datapath.c) and the socket programs (sockops.c) share through the
 * pinned conntrack map `ct` and the socket marks: one layout for both (loader.MAPS checks the
 * map's sizes, 16 and 8). */
#ifndef L7G_SHARED_H
#define L7G_SHARED_H

#define PROXY_UPSTREAM_MARK 0xa00  /* the egress proxy's upstream sockets (the pod's own address) */
#define MARK_MASK 0xf00

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 pad[3];
};
struct ct_value {
    u8 redirect;     /* 1: marked for local delivery (the node's proxies); 2: the egress proxy */
    u8 host;
    u8 proxy_reply;  /* an egress proxy upstream connection: its replies go to the proxy's socket */
    u8 pad;
    u32 src_id;
};

#endif
