//! libmoda: the C ABI over the MODA SDK (not built yet; see issue 6).
