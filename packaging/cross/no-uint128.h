/* Forced into every C++ file of RocksDB when cross-compiling for a 32-bit
 * target (see the README, "Cross-compiling for a gateway"):
 * librocksdb-sys 0.19 defines HAVE_UINT128_EXTENSION for every compiler
 * but MSVC, and 32-bit ARM has no __uint128_t. A file given with -include
 * is read after the command line's -D options, so this takes it back. */
#undef HAVE_UINT128_EXTENSION
