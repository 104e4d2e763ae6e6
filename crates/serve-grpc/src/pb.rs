//! The `kvserve.v1` protobuf messages and the tonic client and server of `Generation`,
//! generated at build time from `proto/kvserve/v1/kvserve.proto`.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations
)]

tonic::include_proto!("kvserve.v1");

/// The encoded `FileDescriptorSet` of `kvserve.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvserve_v1_descriptor");
