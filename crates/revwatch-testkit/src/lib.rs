//! revwatch-testkit
