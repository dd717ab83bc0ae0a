//! The filesystem: kernel requests translated into engine reads.
pub mod fs;
pub mod inode;
pub mod library;
