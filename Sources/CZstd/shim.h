// libzstd (Debian: libzstd-dev), used for compressed training checkpoints (Checkpoint/Zstd.swift).
#include <zstd.h>
