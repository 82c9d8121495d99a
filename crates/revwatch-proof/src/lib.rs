//! revwatch-proof
