//! Picking free loopback ports.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use crate::TestkitError;

/// Returns `n` distinct ports that were free a moment ago.
///
/// All listeners are held until every port is chosen, so the ports are
/// distinct; another process may still grab one before etcd binds it, which
/// the cluster start-up detects and retries.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TestkitError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| TestkitError::io("reading a listener's port", e))
        })
        .collect()
}
