"""The offline tools: `l7gate policy validate` and `l7gate policy trace`. They read files and
answer with no agent, no cluster and no I/O beyond reading the files they are given; they use
the policy core and identities, never the daemon (an import contract in pyproject.toml)."""
