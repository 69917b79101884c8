//! The agentguard daemon and CLI, as a library so integration tests drive the
//! same loader, decoder, policy compiler and daemon the binary uses.
pub mod audit;
pub mod btf;
pub mod cgroups;
pub mod cli;
pub mod compile;
pub mod config;
pub mod control;
pub mod daemon;
pub mod decode;
pub mod dns;
pub mod doctor;
pub mod events;
pub mod filemaps;
pub mod filerules;
pub mod fmode;
pub mod incident;
pub mod killswitch;
pub mod landlock;
pub mod loader;
pub mod mounts;
pub mod netrules;
pub mod policy;
pub mod procfs;
pub mod schema;
pub mod tracefs;
