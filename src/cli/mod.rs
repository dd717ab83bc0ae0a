//! Subcommands. Each module holds its clap `Args` and `run(args) -> anyhow::Result<()>`.
pub mod common;
pub mod control;
pub mod create;
pub mod dht;
pub mod download;
pub mod info;
pub mod librarian;
pub mod mount;
pub mod seed;
pub mod tracker;

/// clap value parser for sizes and rates (`256KiB`, `64M`, ...).
pub fn size_arg(text: &str) -> Result<u64, String> {
    crate::core::units::parse_size(text)
}
