//! Pure logic: no tokio, no sockets, no clock (time is a parameter). Unit-tested beside the code.
pub mod layout;
pub mod metainfo;
