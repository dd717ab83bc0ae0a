//! STUB: being written (torrent creation: walking files, hashing pieces).
