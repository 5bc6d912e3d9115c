//! Synthetic benchmark (in progress).
