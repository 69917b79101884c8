//! The agentguard daemon and CLI, as a library so integration tests can drive
//! the same loader, decoder and policy compiler the binary uses.
pub mod decode;
pub mod loader;
pub mod mounts;
pub mod tracefs;
pub mod doctor;
pub mod policy;
