//! dualroot agent library (see issue 6).
