//! Guest image loaders.
