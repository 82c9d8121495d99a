//! revwatch-server
