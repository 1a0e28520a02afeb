//! QEMU guest harness (see issue 4).
