//! Resilient etcd v3 client.
