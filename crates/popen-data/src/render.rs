//! Overlay rendering (in progress).
