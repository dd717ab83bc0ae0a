//! I/O over the core codecs: sockets, HTTP; events reported on channels.
pub mod dht;
pub mod peer;
pub mod ratelimit;
pub mod tracker;
pub mod tracker_server;
pub mod udp_tracker;
