//! Pure logic: no tokio, no sockets, no clock (time is a parameter). Unit-tested beside the code.
pub mod bencode;
pub mod blame;
pub mod cache;
pub mod choker;
pub mod compact;
pub mod dht;
pub mod krpc;
pub mod layout;
pub mod magnet;
pub mod metadata;
pub mod metainfo;
#[doc(hidden)]
pub mod mutate;
pub mod names;
pub mod peer_proto;
pub mod pex;
pub mod picker;
pub mod routing;
pub mod tracker_proto;
pub mod udp_tracker;
pub mod units;
pub mod wire;
