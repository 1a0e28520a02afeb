//! Bundles: one signed file holding a new root filesystem.

pub mod create;
pub mod manifest;
pub mod outer;
pub mod reader;
pub mod scan;
pub mod tarstream;
pub mod unpack;

pub use create::{create, CreateOptions, CreateReport};
pub use manifest::{CpuLevel, Manifest};
pub use reader::open;
pub use unpack::{unpack_bundle, UnpackOptions, UnpackReport};
