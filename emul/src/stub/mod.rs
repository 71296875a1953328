//! ITS-safe host stubs (see the module files).
